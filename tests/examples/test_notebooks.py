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
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
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
    assert (tmp_path / "runs" / "quickstart" / "checkpoint-100").exists()
    assert "merged matches adapter: True" in "".join(texts)
    assert "reloaded matches adapter: True" in "".join(texts)
    # Rich output: the notebook got HTML tables, not just text.
    htmls = [o["data"].get("text/html", "") for c in code for o in c.outputs if "data" in o]
    assert any("<table" in h for h in htmls)


def _all_text(nb) -> str:
    return "".join(_text(c) for c in nb.cells if c.cell_type == "code")


def _no_errors(nb) -> None:
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors, errors


@pytest.mark.slow
def test_lora_vs_full_notebook(tmp_path):
    import re

    nb = _run("02_lora_vs_full.ipynb", tmp_path)
    _no_errors(nb)
    text = _all_text(nb)
    # the table printed from the sweep's rows: method, accuracy, seconds, trainable parameters, status
    found = re.findall(r"^(.+?)\s+(\d\.\d{3})\s+(\d+\.\d)\s+([\d,]+)  (\S.*)$", text, re.M)
    rows = {
        name.strip(): (float(acc), float(took), int(n.replace(",", "")), status)
        for name, acc, took, n, status in found
    }
    methods = ["full fine-tuning", "LoRA r=4", "LoRA r=8", "LoRA r=16", "head only (frozen backbone)",
               "prompt tuning (8 virtual tokens)", "IA3 (query, value + head)"]  # fmt: skip
    assert sorted(rows) == sorted(methods), text[-3000:]
    assert all(row[3] == "finished" and row[1] > 0 for row in rows.values()), rows
    assert rows["full fine-tuning"][2] == 22_713_986
    assert rows["LoRA r=4"][2] < rows["LoRA r=8"][2] < rows["LoRA r=16"][2] < 200_000
    assert rows["IA3 (query, value + head)"][2] < rows["LoRA r=4"][2]
    assert rows["prompt tuning (8 virtual tokens)"][2] < rows["LoRA r=4"][2]
    assert rows["full fine-tuning"][0] > 0.9 and rows["LoRA r=16"][0] > 0.75
    assert rows["head only (frozen backbone)"][0] < rows["LoRA r=16"][0]
    # the sweep's own table (HTML, best run starred) and the leaderboard widget were shown
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    htmls = [o.get("data", {}).get("text/html", "") for o in outputs]
    assert any("jl-sweep" in h and "★" in h for h in htmls)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    # keep: best leaves the most accurate run in the model; each run's result was saved under the notebook
    assert len(list((tmp_path / "runs" / "lora_vs_full").glob("*/adapter"))) == 7


@pytest.mark.slow
def test_adapters_notebook(tmp_path):
    nb = _run("04_adapters.ipynb", tmp_path)
    _no_errors(nb)
    text = _all_text(nb)
    assert "adapter 'animals':  brown fox jumps" in text
    assert "disabled = base: True" in text and "reloaded numbers adapter matches: True" in text
    assert (tmp_path / "adapters" / "animals" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapters" / "numbers" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_scale_out_notebook(tmp_path):
    nb = _run("05_scale_out.ipynb", tmp_path)
    _no_errors(nb)
    text = _all_text(nb)
    assert text.count("state finished, step 6") == 2
    assert "logged losses agree: True" in text
    assert "single-process and 2-process DDP adapters agree: True" in text
    assert (tmp_path / "job" / "accelerate_fsdp.yaml").exists()


def test_qlora_notebook_skips_cleanly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("runs for real on a GPU machine")
    nb = _run("03_qlora_gpu.ipynb", tmp_path)
    _no_errors(nb)
    assert "this notebook needs one; the cells below skip" in _all_text(nb)


@pytest.mark.slow
def test_vision_notebook(tmp_path):
    import re

    nb = _run("06_vision.ipynb", tmp_path)
    _no_errors(nb)
    text = _all_text(nb)
    before = float(re.search(r"before training: accuracy ([\d.]+)", text).group(1))
    after = float(re.search(r"with the adapter: accuracy ([\d.]+)", text).group(1))
    off = float(re.search(r"adapter off \(the model as it was built\): accuracy ([\d.]+)", text).group(1))
    reloaded = float(re.search(r"reloaded with PEFT: accuracy ([\d.]+)", text).group(1))
    # random weights: about chance; with the adapter off it is the model as it was built
    assert before < 0.6 and off == before
    assert after >= 0.9 and reloaded == after, text
    assert "IMAGE_CLS" in text and "images/s" in text
    rows = dict(re.findall(r"^(circle|square|triangle)\s+[\d.]+\s+([\d.]+)$", text, re.M))
    assert max(rows, key=lambda k: float(rows[k])) == "circle", rows  # the drawn circle is called a circle
    assert (tmp_path / "adapters" / "shapes" / "adapter_model.safetensors").exists()
