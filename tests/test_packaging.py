"""What the distribution declares and ships: the license it names, the type-hint marker, each requirement once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_declared_license_is_shipped(project):
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    authors = [a["name"] for a in project["authors"]]
    assert text.splitlines()[0].startswith("Copyright ") and authors[0] in text.splitlines()[0]


def test_the_package_is_marked_typed():
    # PEP 561: type checkers read the package's hints only when py.typed is in the installed package
    assert resources.files("jupyter_lora").joinpath("py.typed").is_file()


def test_bitsandbytes_is_declared_once_and_installed_on_linux_x86(project):
    extras = project["optional-dependencies"]
    everywhere = project["dependencies"] + [r for reqs in extras.values() for r in reqs]
    assert (
        [r for r in everywhere if r.startswith("bitsandbytes")] == extras["qlora"] == ["bitsandbytes>=0.45"]
    )
    # QLoRA out of the box on Linux x86-64 (Colab): the qlora extra is a dependency there
    assert (
        "jupyter-lora[qlora]; platform_system == 'Linux' and platform_machine == 'x86_64'"
        in (project["dependencies"])
    )
