"""Export: the standalone job is a plain Trainer script that runs on CPU in one process and as two DDP processes
(gloo, via torchrun) without this package, and the adapters it saves load back into the notebook model with the
same outputs."""

from __future__ import annotations

import errno
import json
import os
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


def _run(cmd: list[str], cwd: Path, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    # jupyter_lora cannot be imported by the job: it runs on torch, transformers and peft alone
    blocker = cwd.parent / "no_jupyter_lora"
    (blocker / "jupyter_lora").mkdir(parents=True, exist_ok=True)
    (blocker / "jupyter_lora" / "__init__.py").write_text(
        "raise ImportError('the job must not need jupyter_lora')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(blocker), **env}  # fmt: skip
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _summary(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


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
        "train.jsonl",
        "accelerate_ddp.yaml",
        "accelerate_fsdp.yaml",
    ):
        assert (job / name).exists(), name
    assert "torchrun --nproc_per_node 2 train.py" in result.commands
    assert "LlamaDecoderLayer" in (job / "accelerate_fsdp.yaml").read_text()

    train_py = (job / "train.py").read_text()
    assert "transformers.Trainer(" in train_py and "jupyter_lora" not in train_py.split('"""')[2]
    args = json.loads((job / "job.json").read_text())["training_arguments"]
    assert (args["max_steps"], args["learning_rate"], args["seed"]) == (6, 1e-3, 0)

    single = _summary(_run([sys.executable, "train.py"], job))
    assert (single["state"], single["step"]) == ("finished", 6)
    shutil.move(job / "runs", tmp_path / "single")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    ddp_out = _run([torchrun, "--nproc_per_node", "2", "train.py"], job)
    ddp = _summary(ddp_out)
    assert (ddp["state"], ddp["step"]) == ("finished", 6)
    assert len([line for line in ddp_out.stdout.splitlines() if line.startswith('{"state"')]) == 1, (
        "rank 0 reports"
    )
    # the logged loss is the Trainer's reduction over both processes (each saw half of every batch)
    assert ddp["final_loss"] == pytest.approx(single["final_loss"], abs=1e-4)

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
    assert job["task"] == "CAUSAL_LM" and "tokenizer/" in result.files
    tokenizer = tiny_tokenizer()
    rows = [json.loads(line) for line in (tmp_path / "job" / "train.jsonl").read_text().splitlines()]
    assert sorted(tokenizer.decode(r["input_ids"], skip_special_tokens=True).strip() for r in rows) == [
        "hello world",
        "the quick brown fox",
    ], "the job trains on the examples as the notebook tokenized them"
    assert "base/" not in result.files and (tmp_path / "job" / "tokenizer").is_dir()
    assert _summary(_run([sys.executable, "train.py"], tmp_path / "job"))["step"] == 2
    saved = tmp_path / "job" / "runs" / "adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "tokenizer_config.json").is_file()


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
    # text without a tokenizer: found before anything is written
    with pytest.raises(UsageError, match="`tokenizer` is missing"):
        jl.export(model, tmp_path / "b", ["x"])
    assert sorted(os.listdir(tmp_path)) == ["full"], "nothing written, no staging directory left"


def test_a_failed_export_leaves_nothing_and_the_retry_works(tmp_path, monkeypatch):
    from jupyter_lora.core import export as export_module

    model = jl.inject(tiny_model("llama"), r=4)

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(export_module, "_write_jsonl", broken)
    with pytest.raises(
        UsageError, match=r"Cannot write the job to `directory` .*: no space left on the device"
    ) as info:
        jl.export(model, tmp_path / "job", _data(), steps=2)
    assert "saving-" not in str(info.value), "the message names the job, not the staging directory"
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    result = jl.export(model, tmp_path / "job", _data(), steps=2)
    assert (result.directory / "train.py").is_file() and sorted(os.listdir(tmp_path)) == ["job"]


def test_export_takes_a_tokenizer_path(tmp_path):
    from jupyter_lora.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    model = jl.inject(tiny_model("llama"), r=4)
    result = jl.export(model, tmp_path / "job", ["hello world"], tokenizer=str(tmp_path / "tok"), steps=1)
    assert (result.directory / "tokenizer").is_dir()


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
    jl.export(model, tmp_path / "job", _data(), **SETTINGS)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    out = _run([sys.executable, "train.py"], tmp_path / "job", ok=False, ACCELERATE_USE_FSDP="true")
    assert out.returncode != 0 and "FSDP shards the model over GPUs" in out.stderr
    assert not (tmp_path / "job" / "runs").exists()


def test_export_refusals_and_the_jobs_own_checks(tmp_path):
    model = jl.inject(tiny_model("llama"), r=4)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        jl.export(model, tmp_path / "afile", _data())
    # Liger's kernels are the job machine's business: asking for them on a CPU notebook still exports
    result = jl.export(model, tmp_path / "job", _data(), steps=2, kernels="liger")
    assert json.loads((result.directory / "job.json").read_text())["kernels"] == "liger"
    out = _run([sys.executable, "train.py", "--resume"], result.directory, ok=False)
    assert out.returncode != 0 and "no checkpoint" in out.stderr and "Traceback" not in out.stderr
    shutil.rmtree(result.directory / "adapter")
    out = _run([sys.executable, "train.py"], result.directory, ok=False)
    assert out.returncode != 0 and "holds no adapter" in out.stderr and "Traceback" not in out.stderr
