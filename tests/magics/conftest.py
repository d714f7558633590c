"""A real IPython shell with the extension loaded, shared by the magics tests."""

from __future__ import annotations

import pytest
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython


@pytest.fixture(scope="session")
def shell():
    ip = start_ipython() or get_ipython()  # start_ipython returns None once started (e.g. by another test)
    ip.reset()
    yield ip
    ip.reset()


def _clear_namespace(shell) -> None:
    # What ip.reset() does for the user's variables, without its gc.collect() (a quarter second each time
    # once torch is loaded).
    for name in [k for k in shell.user_ns if k not in shell.user_ns_hidden]:
        del shell.user_ns[name]
    shell.user_ns.update({"_": "", "__": "", "___": ""})
    shell.user_ns["Out"].clear()


@pytest.fixture
def ip(shell):
    """The shared test shell with an empty namespace and a freshly loaded extension (default settings)."""
    _clear_namespace(shell)
    shell.config.pop("LoraMagics", None)  # %config values live on in the shell's config across reloads
    manager = shell.extension_manager
    if "jupyter_lora" in manager.loaded:
        manager.unload_extension("jupyter_lora")
    manager.load_extension("jupyter_lora")
    yield shell
    _clear_namespace(shell)
