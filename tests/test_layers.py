"""The package's import rules: cheap top-level import, and a core that knows nothing about notebooks."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_import_is_cheap():
    out = _run(
        "import sys, jupyter_lora; print(sorted(m for m in ('torch', 'transformers', 'peft', 'IPython') if m in sys.modules))"
    )
    assert out == "[]"


def test_core_does_not_import_notebook_packages():
    code = (
        "import sys, jupyter_lora.core.adapters, jupyter_lora.core.memory, jupyter_lora.core.plan, jupyter_lora.display;"
        "print(sorted(m for m in ('IPython', 'ipywidgets', 'plotly', 'anywidget') if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_public_api_resolves():
    out = _run("import jupyter_lora as jl; print(all(callable(getattr(jl, n)) for n in jl.__all__))")
    assert out == "True"
