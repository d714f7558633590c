"""The engine: targets, plans, memory estimates, adapter operations and training. Imports torch, transformers
and PEFT; never IPython, ipywidgets or plotly."""

import logging as _logging


class _HideHubKernelHint(_logging.Filter):
    """bitsandbytes (0.50, CPU build) logs at import that it failed to fetch an optional kernel from the Hugging
    Face Hub and suggests `pip install kernels`; on an offline or GPU-less machine that is noise that points users
    at a download. Only that record is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HideHubKernelHint())
