"""Execute the example notebooks with nbclient, offline on CPU, and check their outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "".join(parts)


def _run(name: str, tmp_path: Path):
    shutil.copy(EXAMPLES / name, tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return nb


@pytest.mark.slow
def test_quickstart_notebook(tmp_path):
    nb = _run("01_quickstart.ipynb", tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_text(c) for c in code]
    assert not [t for t in texts if "Error" in t], texts
    by_source = {c.source.splitlines()[0]: _text(c) for c in code}
    assert "dry run" in by_source["%%lora model --dry-run"]
    summary = by_source["%%lora model"]
    assert "now holds the adapted model" in summary and "trainable" in summary and "q_proj" in summary
    assert "Training ≈" in by_source["%lora estimate model --seq 512 --batch 4"]
    compared = by_source['%lora compare model "the quick brown" --max-new-tokens 20']
    assert "adapter 'default':  fox jumps" in compared, compared  # it learned the sentence; the base did not
    assert "base:               fox jumps" not in compared
    assert "Saved the adapter" in by_source["%lora save model adapters/quickstart"]
    assert (tmp_path / "adapters" / "quickstart" / "adapter_model.safetensors").exists()
    assert "<TrainingRun finished: step 100/100" in "".join(texts)
    assert (tmp_path / "runs" / "quickstart" / "checkpoint-000100").exists()
    assert "merged matches adapter: True" in "".join(texts)
    assert "reloaded matches adapter: True" in "".join(texts)
    # Rich output: the notebook got HTML tables, not just text.
    htmls = [o["data"].get("text/html", "") for c in code for o in c.outputs if "data" in o]
    assert any("<table" in h for h in htmls)
