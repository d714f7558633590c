"""Export: the standalone job runs on CPU in one process and as two DDP processes (gloo, via torchrun), and the
adapters it saves load back into the notebook model with the same outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_inputs, tiny_model

SETTINGS = dict(steps=6, batch=4, lr=1e-3, eval=0, seed=0)


def _data():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 100, (16,), generator=g).tolist()} for _ in range(32)]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.slow
def test_exported_job_runs_single_and_ddp_with_the_same_result(tmp_path):
    torch.manual_seed(0)
    model = jl.inject(tiny_model("llama"), r=4, targets="all-linear")
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    result = jl.export(model, tmp_path / "job", _data(), **SETTINGS)
    assert torch.equal(_logits(model, inputs), before), "exporting leaves the notebook model as it was"
    assert any(hasattr(m, "lora_A") for m in model.modules())
    job = tmp_path / "job"
    for name in (
        "train.py",
        "job.json",
        "adapter",
        "base",
        "data.jsonl",
        "accelerate_ddp.yaml",
        "accelerate_fsdp.yaml",
    ):
        assert (job / name).exists(), name
    assert "torchrun --nproc_per_node 2 train.py" in result.commands
    assert "LlamaDecoderLayer" in (job / "accelerate_fsdp.yaml").read_text()

    single = _run([sys.executable, "train.py"], job)
    assert "state finished, step 6" in single
    shutil.move(job / "runs", tmp_path / "single")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    ddp = _run([torchrun, "--nproc_per_node", "2", "train.py"], job)
    assert "state finished, step 6" in ddp
    assert "'tokens': 192" in ddp, "each of the two processes saw half of every batch"
    # the logged loss is the Trainer's reduction over both processes, not one process's share
    final = [float(re.search(r"'final_loss': ([0-9.e-]+)", out).group(1)) for out in (single, ddp)]
    assert final[1] == pytest.approx(final[0], abs=1e-4)

    one = jl.load(model, tmp_path / "single" / "adapter", name="single")
    out_single = _logits(one, inputs)
    two = jl.load(one, job / "runs" / "adapter", name="ddp")
    out_ddp = _logits(two, inputs)
    assert not torch.allclose(out_single, before, atol=1e-6), "training changed the adapter"
    torch.testing.assert_close(out_ddp, out_single, rtol=1e-4, atol=1e-5)


def test_export_with_a_tokenizer_and_text_data_and_a_named_base(tmp_path):
    from jupyter_lora.testing import tiny_tokenizer

    base_dir = tmp_path / "base-model"
    tiny_model("llama").save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = jl.inject(AutoModelForCausalLM.from_pretrained(base_dir), r=4)
    data_file = tmp_path / "texts.txt"
    data_file.write_text("hello world\nthe quick brown fox\n")
    result = jl.export(model, tmp_path / "job", str(data_file), tokenizer=tiny_tokenizer(), steps=2, batch=2)
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert job["base"] == str(base_dir) and not job["base_is_local"]
    assert job["data"] == str(data_file) and job["tokenizer"] == "tokenizer"
    assert "base/" not in result.files and (tmp_path / "job" / "tokenizer").is_dir()
    assert "state finished, step 2" in _run([sys.executable, "train.py"], tmp_path / "job")


def test_export_errors(tmp_path):
    with pytest.raises(UsageError, match="no LoRA adapter"):
        jl.export(tiny_model("llama"), tmp_path / "a", ["x"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    model = jl.inject(tiny_model("llama"), r=4)
    with pytest.raises(UsageError, match="not empty"):
        jl.export(model, tmp_path / "full", ["x"])
    with pytest.raises(UsageError, match="Did you mean `steps`"):
        jl.export(model, tmp_path / "b", ["x"], stpes=3)
    assert not (tmp_path / "b").exists()


def test_fsdp_without_a_gpu_is_refused_not_downgraded(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("FSDP can run here")
    monkeypatch.setenv(
        "ACCELERATE_USE_FSDP", "true"
    )  # what `accelerate launch --config_file accelerate_fsdp.yaml` sets
    model = jl.inject(tiny_model("llama"), r=4, targets="all-linear")
    with pytest.raises(jl.UsageError, match=r"FSDP was asked for .* no CUDA GPU"):
        jl.train(model, _data(), output_dir=str(tmp_path), background=False, **SETTINGS)
    assert not list(tmp_path.iterdir())
