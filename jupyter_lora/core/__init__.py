"""The engine: targets, plans, memory estimates, adapter operations and training. Imports torch, transformers
and PEFT; never IPython, ipywidgets or plotly, and nothing from the package's display, widgets or magics."""

from .quant import hide_hub_kernel_hint

# PEFT and transformers import bitsandbytes whenever it is installed, from any of the modules below: its import-time
# hint about a Hub kernel is dropped here, once, before any of them loads.
hide_hub_kernel_hint()
