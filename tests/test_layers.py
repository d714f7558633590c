"""The package's import rules: a cheap top-level import, a core that knows nothing about notebooks (at run time
and in its source), and imports that point one way only (no cycle among the package's modules)."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jupyter_lora
import jupyter_lora.core

PACKAGE = Path(jupyter_lora.__file__).resolve().parent
NOTEBOOK_PACKAGES = ("IPython", "ipywidgets", "plotly", "anywidget")
FRONT_LAYERS = (
    "jupyter_lora.display",
    "jupyter_lora.data_preview",
    "jupyter_lora.widgets",
    "jupyter_lora.magics",
)


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def _core_modules() -> list[str]:
    found = pkgutil.walk_packages(jupyter_lora.core.__path__, prefix="jupyter_lora.core.")
    return ["jupyter_lora.core", *sorted(m.name for m in found)]


def _is_front(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FRONT_LAYERS)


def _package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["jupyter_lora", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source (in functions and TYPE_CHECKING blocks
    too): ``from .x import y`` counts as ``.x.y`` when that is a module, else as ``.x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


# ----------------------------------------------------------------------------------------------- tests


def test_import_is_cheap():
    out = _run(
        "import sys, jupyter_lora; print(sorted(m for m in ('torch', 'transformers', 'peft', 'IPython') if m in sys.modules))"
    )
    assert out == "[]"


def test_import_inside_ipython_stays_cheap_and_registers_the_renderings():
    code = textwrap.dedent(
        """
        import sys
        from IPython.testing.globalipapp import start_ipython
        shell = start_ipython()
        import jupyter_lora
        html = shell.display_formatter.formatters["text/html"]
        print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
        print(html.for_type_by_name("jupyter_lora.core.plan", "Plan") is not None)
        """
    )
    assert _run(code).splitlines() == ["[]", "True"]


def test_results_render_through_the_shell_with_or_without_the_extension():
    """Imported before IPython started, the package renders nothing until ``%load_ext``; the extension teaches the
    shell the renderings (HTML and aligned text) and ``%unload_ext`` takes them away again."""
    code = textwrap.dedent(
        """
        import jupyter_lora as jl
        from jupyter_lora.testing import tiny_model
        from IPython.testing.globalipapp import start_ipython
        shell = start_ipython()
        shell.display_formatter.formatters["text/html"].enabled = True  # as in a Jupyter kernel
        p = jl.plan(tiny_model("llama"), r=4, targets="q_proj")

        def shown():
            data, _ = shell.display_formatter.format(p)
            return data["text/plain"].splitlines()[:4], "<table" in data.get("text/html", "")

        print(shown())
        shell.extension_manager.load_extension("jupyter_lora")
        print(shown())
        shell.extension_manager.unload_extension("jupyter_lora")
        print(shown())
        """
    )
    before, hello, loaded, unloaded = _run(code).splitlines()
    assert hello.startswith("jupyter_lora ") and "%lora help" in hello  # the extension's one line
    assert before == unloaded and before.startswith("([\"Plan(LoRA 'default'")
    assert loaded.endswith("True)") and re.search(r"'module +kind +count +shape +params'", loaded), loaded


def test_no_core_module_loads_notebook_packages_or_the_front_layers():
    """Each module under jupyter_lora/core imported in turn in a fresh interpreter: none of them loads IPython,
    ipywidgets, plotly, anywidget, display, widgets or magics (each one is charged with what its import added)."""
    modules = _core_modules()
    assert len(modules) > 15 and "jupyter_lora.core.adapters.operations" in modules
    code = textwrap.dedent(
        f"""
        import importlib, json, sys

        def forbidden():
            return {{
                m for m in sys.modules
                if m.split(".")[0] in {NOTEBOOK_PACKAGES!r}
                or any(m == f or m.startswith(f + ".") for f in {FRONT_LAYERS!r})
            }}

        added, before = {{}}, forbidden()
        for name in {modules!r}:
            importlib.import_module(name)
            now = forbidden()
            added[name] = sorted(now - before)[:5]
            before = now
        print(json.dumps(added))
        """
    )
    added = json.loads(_run(code))
    assert set(added) == set(modules)
    assert {name: found for name, found in added.items() if found} == {}


def test_core_source_never_imports_the_front_layers():
    """Not even lazily inside a function: the dependency must not exist at all."""
    modules = _package_modules()
    offenders = {}
    for name, path in modules.items():
        if name == "jupyter_lora.core" or name.startswith("jupyter_lora.core."):
            front = sorted(m for m in _imports(name, path, modules) if _is_front(m))
            named = re.findall(
                r"""["'](jupyter_lora\.(?:display|data_preview|widgets|magics)[\w.]*)["']""", path.read_text()
            )
            if front or named:
                offenders[name] = front + named
    assert offenders == {}


def _import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_touches_core_or_display():
    graph = _import_graph()
    assert graph["jupyter_lora.core.train"] >= {"jupyter_lora.core.runs"}
    layered = ("jupyter_lora.core", "jupyter_lora.display")
    touching = [c for c in _cycles(graph) if any(m == p or m.startswith(p + ".") for m in c for p in layered)]
    assert touching == []


def test_import_graph_has_no_cycle():
    assert _cycles(_import_graph()) == []


def test_public_api_resolves():
    out = _run("import jupyter_lora as jl; print(all(callable(getattr(jl, n)) for n in jl.__all__))")
    assert out == "True"
    out = _run(
        "import jupyter_lora as jl, jupyter_lora.api as api; print(sorted(jl.__all__) == sorted(api.__all__))"
    )
    assert out == "True"


def test_no_bitsandbytes_hub_hint_whichever_module_loads_peft_first():
    """bitsandbytes (imported by PEFT and transformers when installed) logs a hint to download a Hub kernel; it is
    dropped once for the whole package, whichever entry point loads PEFT first."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed here")
    for entry in (
        "jupyter_lora.ProgressCallback",
        "jupyter_lora.core.train.engine",
        "jupyter_lora.core.plan",
    ):
        module, _, attr = entry.rpartition(".") if entry.endswith("Callback") else (entry, "", "")
        code = f"import {module}\n" + (f"{module}.{attr}\n" if attr else "") + "import peft, bitsandbytes\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "kernels-community" not in out.stderr + out.stdout, entry
