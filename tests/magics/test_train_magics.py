"""%%lora train, %lora stop and %lora resume in a real shell (text progress: no front end here)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from IPython.core.error import UsageError
from shell_cells import run as _cell

import jupyter_lora as jl
from jupyter_lora.magics import parse as p

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

SETUP = (
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "import jupyter_lora as jl\n"
    "model = jl.inject(tiny_model('llama'), r=8, targets='all-linear, lm_head')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 16\n"
)


def test_parse_keys_follow_the_engine_settings():
    from jupyter_lora.core.train import TrainConfig
    from jupyter_lora.settings import keys

    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(keys("train"))
    assert p.parse("train model", "data: x\nsteps: 3").settings == {"data": "x", "steps": 3}


def test_train_runs_in_the_background_and_returns_at_once(ip, tmp_path, capsys):
    _cell(ip, SETUP)
    ip.run_line_magic("config", "LoraMagics.progress = 'text'")
    start = time.perf_counter()
    _cell(
        ip,
        f"%%lora train model\ndata: texts\nsteps: 30\nlr: 3e-3\nbatch: 4\neval: 0\noutput_dir: {tmp_path}\n",
    )
    returned_after = time.perf_counter() - start
    run = jl.last_run(ip.user_ns["model"])
    assert run is not None
    _cell(ip, "x = 1 + 1")  # the kernel is free meanwhile
    run.wait(120)
    assert run.state == "finished" and run.step == 30
    assert returned_after < 5
    out = capsys.readouterr().out
    assert "30 steps" in out and "tok/s" in out and "checkpoint-30" in out  # start line and end summary
    assert run.history[-1]["loss"] < run.history[0]["loss"]


def test_stop_and_resume(ip, tmp_path):
    _cell(ip, SETUP)
    ip.run_line_magic("config", "LoraMagics.progress = 'text'")
    _cell(ip, f"%%lora train model\ndata: texts\nsteps: 100000\nbatch: 2\neval: 0\noutput_dir: {tmp_path}\n")
    run = jl.last_run(ip.user_ns["model"])
    deadline = time.time() + 60
    while run.step < 2 and time.time() < deadline:
        time.sleep(0.05)
    note = _cell(ip, "%lora stop model")
    assert "Stopped training `model`" in repr(note) and run.state == "stopped"
    assert run.checkpoint is not None and run.checkpoint.exists()
    stopped_at = run.step
    _cell(ip, "%%lora resume model\nsteps: " + str(stopped_at + 3) + "\n")
    resumed = jl.last_run(ip.user_ns["model"])
    assert resumed is not run
    resumed.wait(60)
    assert resumed.state == "finished" and resumed.step == stopped_at + 3


def test_train_errors(ip):
    _cell(ip, SETUP)
    with pytest.raises(UsageError, match="needs `data:`"):
        ip.run_cell_magic("lora", "train model", "steps: 3\n")
    with pytest.raises(UsageError, match=r"no variable `txts`.*Did you mean `texts`"):
        ip.run_cell_magic("lora", "train model", "data: txts\n")
    with pytest.raises(UsageError, match="Did you mean `steps`"):
        ip.run_cell_magic("lora", "train model", "data: texts\nstpes: 3\n")
    with pytest.raises(UsageError, match="not training"):
        ip.run_line_magic("lora", "stop model")
    with pytest.raises(UsageError, match="No checkpoint to resume from"):
        ip.run_line_magic("lora", "resume model")


def test_stop_names_a_variable_that_holds_no_model(ip):
    with pytest.raises(UsageError, match="no variable `nosuch`"):
        ip.run_line_magic("lora", "stop nosuch")


def test_export_cell_writes_the_job_with_its_eval_data(ip, tmp_path):
    import json

    _cell(ip, SETUP + "held_out = ['a different sentence for evaluation.'] * 3\n")
    result = _cell(
        ip,
        f"%%lora export model {tmp_path / 'job'}\ndata: texts\neval_data: held_out\ntokenizer: tok\nsteps: 4\n",
    )
    assert "eval.jsonl" in result.files and "tokenizer/" in result.files
    job = json.loads((tmp_path / "job" / "job.json").read_text())
    assert (
        job["training_arguments"]["max_steps"] == 4 and job["training_arguments"]["eval_strategy"] == "steps"
    )
    assert len((tmp_path / "job" / "eval.jsonl").read_text().splitlines()) == 3


def test_a_refused_second_train_draws_nothing_but_its_error(ip, tmp_path, monkeypatch, capsys):
    from jupyter_lora.widgets.progress import frontend

    shown = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    _cell(ip, SETUP)
    ip.run_line_magic("config", "LoraMagics.progress = 'widget'")
    _cell(
        ip,
        f"%%lora train model\ndata: texts\nsteps: 100000\nbatch: 2\neval: 0\noutput_dir: {tmp_path / 'a'}\n",
    )
    run = jl.last_run(ip.user_ns["model"])
    try:
        assert len(shown) == 1
        result = ip.run_cell(
            f"%%lora train model\ndata: texts\nsteps: 5\neval: 0\noutput_dir: {tmp_path / 'b'}\n"
        )
        assert "already training" in str(result.error_in_exec)
        assert len(shown) == 1, "the refused start displayed a progress widget"
        assert jl.last_run(ip.user_ns["model"]) is run and run.running
    finally:
        run.stop()
    assert run.state == "stopped"


def test_resume_takes_settings_on_the_line():
    command = p.parse("resume model runs/a/checkpoint-4 steps=30 lr=1e-4")
    assert (command.model, command.checkpoint) == ("model", "runs/a/checkpoint-4")
    assert command.settings == {"steps": 30, "lr": 1e-4}
    assert p.parse("resume model steps=9", "steps: 5\nbatch: 2").settings == {"steps": 9, "batch": 2}
    with pytest.raises(jl.UsageError, match=r"%lora resume: unknown setting `stpes`\. Did you mean `steps`"):
        p.parse("resume model stpes=30")


def test_resume_extends_a_finished_run_with_steps_on_the_line(ip, tmp_path):
    _cell(ip, SETUP)
    ip.run_line_magic("config", "LoraMagics.progress = 'text'")
    _cell(ip, f"%%lora train model\ndata: texts\nsteps: 2\nbatch: 2\neval: 0\noutput_dir: {tmp_path}\n")
    jl.last_run(ip.user_ns["model"]).wait(60)
    _cell(ip, f"%lora resume model {tmp_path / 'checkpoint-2'} steps=4")
    resumed = jl.last_run(ip.user_ns["model"])
    resumed.wait(60)
    assert resumed.state == "finished" and resumed.step == 4
