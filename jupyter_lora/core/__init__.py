"""The engine: targets, plans, memory estimates, adapter operations and training. Imports torch, transformers
and PEFT; never IPython, ipywidgets or plotly, and nothing from the package's display, widgets or magics."""
