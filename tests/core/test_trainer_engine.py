"""Training runs on transformers.Trainer: its checkpoints go both ways (here <-> a plain Trainer), a checkpoint can
never run code, a failed resume changes nothing, keep-best survives stop/resume, tracking goes through the
Trainer's integrations, mistakes show before step 1, and Ctrl-C is a Stop."""

from __future__ import annotations

import _thread
import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")
DATA = [f"sample {i}: " + "abcdefghij"[: 3 + i % 7] for i in range(40)]
SETTINGS = dict(lr=2e-3, batch=4, eval=0, seed=3, warmup=2, tokenizer=None)


def _lm():
    return jl.inject(tiny_model("llama"), r=8, targets="all-linear")


def _settings(**changes):
    return {**SETTINGS, "tokenizer": tiny_tokenizer(), **changes}


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _stop_at(k):
    def observer(event):
        if event.kind == "step" and event.step == k:
            observer.run.stop(wait=False)

    return observer


def _plain_trainer(model, data, output_dir, **args):
    """A user's own transformers.Trainer over the same examples and collator, with the settings of SETTINGS."""
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-3,
        warmup_steps=2, lr_scheduler_type="cosine", optim="adamw_torch", logging_steps=1, save_strategy="steps",
        save_steps=4, seed=3, data_seed=3, use_cpu=True, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, **args,
    )  # fmt: skip
    return Trainer(model=model, args=arguments, train_dataset=data.train, data_collator=data.collate)


def test_a_checkpoint_written_here_resumes_in_a_plain_trainer(tmp_path):
    model = _lm()
    stopper = _stop_at(4)
    run = jl.train(model, DATA, steps=8, output_dir=str(tmp_path / "here"), observers=stopper, **_settings())
    stopper.run = run
    run.wait(120)
    assert run.state == "stopped" and run.checkpoint.name == "checkpoint-4"
    trainer = _plain_trainer(model, run.data, tmp_path / "here")
    trainer.train(resume_from_checkpoint=str(run.checkpoint))
    assert trainer.state.global_step == 8
    full = jl.train(_lm(), DATA, steps=8, output_dir=str(tmp_path / "full"), background=False, **_settings())
    plain = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert plain[-4:] == pytest.approx([h["loss"] for h in full.history][-4:], rel=1e-5)


def test_a_plain_trainer_checkpoint_resumes_here(tmp_path):
    full = jl.train(_lm(), DATA, steps=8, output_dir=str(tmp_path / "full"), background=False, **_settings())
    model = _lm()
    data = full.data
    _plain_trainer(model, data, tmp_path / "plain").train()
    resumed = jl.resume(_lm(), tmp_path / "plain" / "checkpoint-4", data=DATA, steps=8, background=False,
                        **{k: v for k, v in _settings().items() if k != "eval"})  # fmt: skip
    assert resumed.state == "finished" and resumed.step == 8
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)


def test_a_plain_trainer_checkpoint_continues_its_own_run(tmp_path):
    """Without settings of its own, a plain Trainer's checkpoint continues to the steps and batch it planned."""
    data = jl.train(
        _lm(), DATA, steps=1, output_dir=str(tmp_path / "prep"), background=False, **_settings()
    ).data
    _plain_trainer(_lm(), data, tmp_path / "plain").train()
    shutil.rmtree(tmp_path / "plain" / "checkpoint-8")
    resumed = jl.resume(_lm(), tmp_path / "plain", data=DATA, background=False, tokenizer=tiny_tokenizer())
    assert resumed.state == "finished" and (resumed.step, resumed.total_steps) == (8, 8)
    assert resumed.config.batch == 4


def test_output_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    first = jl.train(
        _lm(), DATA, steps=4, save_every=2, output_dir=str(tmp_path), background=False, **_settings()
    )
    before = _digest(tmp_path)
    with pytest.raises(
        UsageError, match=r"already holds another run's checkpoints \(checkpoint-2, checkpoint-4\)"
    ):
        jl.train(
            _lm(), DATA, steps=6, save_every=2, output_dir=str(tmp_path), background=False, **_settings()
        )
    assert _digest(tmp_path) == before
    more = jl.resume(first.model, tmp_path, steps=6, background=False)  # what the message offers
    assert more.state == "finished" and more.step == 6


def test_a_nan_loss_ends_the_run_without_saving_over_the_last_checkpoint(tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(
        UsageError,
        match=r"The loss became nan at step 4: training stopped and this state was not saved; the last checkpoint .*checkpoint-2",
    ):
        jl.train(_lm(), DATA, steps=8, save_every=2, output_dir=str(tmp_path), callbacks=[Poison()], background=False,
                 **_settings())  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"early_stop": 2}, "`early_stop` needs evaluation data"), ({"keep_best": True, "eval": 0}, "`keep_best` needs"),
     ({"trainer_args": 5}, "`trainer_args` must be a mapping"), ({"trainer_args": "x"}, "`trainer_args` must be")],
    ids=["early-stop-without-eval", "keep-best-without-eval", "trainer-args-int", "trainer-args-str"],
)  # fmt: skip
def test_more_mistakes_show_before_step_one(tmp_path, changes, match):
    model = _lm()
    weights = _trainable(model)
    with pytest.raises(UsageError, match=match):
        jl.train(model, DATA[:30], steps=2, output_dir=str(tmp_path / "runs"), background=False,
                 **{**_settings(), **changes})  # fmt: skip
    assert not (tmp_path / "runs").exists() and _same(weights, _trainable(model))


def test_a_stop_asked_by_your_own_callback_leaves_a_checkpoint(tmp_path):
    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    model = _lm()
    run = jl.train(model, DATA, steps=8, output_dir=str(tmp_path), callbacks=[StopAt3()], background=False,
                   **_settings())  # fmt: skip
    assert run.step == 3 and run.checkpoint == tmp_path / "checkpoint-3"
    assert jl.resume(model, steps=5, background=False).step == 5


def test_token_ids_outside_the_vocabulary_are_refused_before_step_one(tmp_path):
    model = _lm()
    vocab = model.get_input_embeddings().num_embeddings
    weights = _trainable(model)
    with pytest.raises(UsageError, match=rf"record 1: `input_ids` holds token id {vocab}, outside"):
        jl.train(model, [{"input_ids": [1, 2, 3]}, {"input_ids": [4, vocab]}] * 4, steps=1, batch=2, eval=0,
                 output_dir=str(tmp_path / "runs"), background=False)  # fmt: skip
    assert not (tmp_path / "runs").exists() and _same(weights, _trainable(model))


def test_a_checkpoint_without_optimizer_state_resumes_with_a_warning(tmp_path):
    model = _lm()
    run = jl.train(model, DATA, steps=2, output_dir=str(tmp_path), background=False, **_settings())
    (run.checkpoint / "optimizer.pt").unlink()
    with pytest.warns(UserWarning, match="no optimizer.pt: the run continues with a fresh optimizer"):
        more = jl.resume(model, steps=3, background=False)
    assert more.state == "finished"


def test_resume_from_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(UsageError, match=r"`checkpoint` .*missing' does not exist"):
        jl.resume(_lm(), tmp_path / "missing", data=DATA, background=False)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "jupyter-lora-pwned"


def test_no_checkpoint_file_is_ever_unpickled(tmp_path):
    model = _lm()
    run = jl.train(model, DATA, steps=2, output_dir=str(tmp_path), background=False, **_settings())
    checkpoint = run.checkpoint
    MARKER.unlink(missing_ok=True)
    for file in checkpoint.iterdir():
        if file.suffix in (".pt", ".pth", ".bin", ".safetensors"):
            file.write_bytes(pickle.dumps(_Payload()))
    before = _digest(checkpoint)
    weights = _trainable(model)
    with pytest.raises(UsageError, match="checkpoint") as excinfo:
        jl.resume(model, checkpoint, data=DATA, steps=4, background=False)
    assert "\n" not in str(excinfo.value) and "weights_only=False" not in str(excinfo.value)
    assert not MARKER.exists(), "a checkpoint file ran code"
    assert _digest(checkpoint) == before and _same(weights, _trainable(model))


@pytest.mark.parametrize(
    "damage", ["other-rank", "optimizer-pickle", "no-state", "optimizer-empty", "scheduler-dict"]
)
def test_a_failed_resume_changes_nothing(tmp_path, damage):
    source = _lm()
    run = jl.train(source, DATA, steps=2, output_dir=str(tmp_path), background=False, **_settings())
    checkpoint = run.checkpoint
    model = jl.inject(tiny_model("llama"), r=4, targets="all-linear") if damage == "other-rank" else _lm()
    if damage == "optimizer-pickle":
        (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_Payload()))
    if damage == "no-state":
        (checkpoint / "trainer_state.json").write_text("{not json")
    if damage == "optimizer-empty":  # plain tensors, but not an optimizer state: found only while loading
        torch.save({}, checkpoint / "optimizer.pt")
    if damage == "scheduler-dict":
        torch.save({"x": 1}, checkpoint / "scheduler.pt")
    before, weights = _digest(checkpoint), _trainable(model)
    with pytest.raises(UsageError) as excinfo:
        jl.resume(model, checkpoint, data=DATA, steps=4, background=False)
    assert "\n" not in str(excinfo.value)
    assert _digest(checkpoint) == before, "the checkpoint is byte-identical"
    assert _same(weights, _trainable(model)), "the live adapter is unchanged"
    assert jl.last_run(model) is None or not jl.last_run(model).running


def test_keep_best_and_early_stop_survive_stop_and_resume(tmp_path):
    settings = _settings(eval=8, eval_every=2, early_stop=50, steps=10)
    full = jl.train(_lm(), DATA, output_dir=str(tmp_path / "a"), background=False, **settings)
    model = _lm()
    stopper = _stop_at(5)
    run = jl.train(model, DATA, output_dir=str(tmp_path / "b"), observers=stopper, **settings)
    stopper.run = run
    run.wait(120)
    assert run.state == "stopped"
    resumed = jl.resume(model, background=False)
    assert resumed.state == "finished" and resumed.step == 10
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    assert [e["eval_loss"] for e in resumed.evals] == pytest.approx(
        [e["eval_loss"] for e in full.evals], rel=1e-5
    )


def test_a_finished_run_can_be_extended(tmp_path):
    model = _lm()
    run = jl.train(model, DATA, steps=4, output_dir=str(tmp_path), background=False, **_settings())
    more = jl.resume(model, steps=6, background=False)
    assert run.state == more.state == "finished" and more.step == 6 and len(more.history) == 6
    with pytest.raises(UsageError, match="must be more than the checkpoint's step 6"):
        jl.resume(model, steps=6, background=False)


def test_tensorboard_tracking_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jl.train(_lm(), DATA, steps=3, output_dir=str(tmp_path), background=False, report_to="tensorboard",
             run_name="r8", **_settings())  # fmt: skip
    files = list(tmp_path.rglob("events.out.tfevents.*"))  # the Trainer's place: output_dir/runs/...
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 3


def test_a_missing_tracker_names_the_install_command(tmp_path):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    with pytest.raises(UsageError, match="pip install mlflow"):
        jl.train(
            _lm(),
            DATA,
            steps=1,
            output_dir=str(tmp_path),
            report_to="mlflow",
            background=False,
            **_settings(),
        )
    assert not list(tmp_path.iterdir())


def test_trainer_args_and_callbacks_pass_through(tmp_path):
    seen = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((state.global_step, args.logging_first_step))

    jl.train(_lm(), DATA, steps=2, output_dir=str(tmp_path), background=False, callbacks=[Count()],
             trainer_args={"logging_first_step": True}, **_settings())  # fmt: skip
    assert seen == [(1, True), (2, True)]
    with pytest.raises(UsageError, match="trainer_args"):
        jl.train(
            _lm(), DATA, steps=2, output_dir=str(tmp_path), trainer_args={"no_such_field": 1}, **_settings()
        )


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"max_grad_norm": float("nan")}, "`max_grad_norm`"), ({"lr": float("inf")}, "`lr`"),
     ({"output_dir": "FILE"}, "is a file"), ({"data": []}, "data"), ({"tokenizer": "none"}, "tokenizer")],
    ids=["nan-clip", "inf-lr", "output-dir-file", "empty-data", "no-tokenizer"],
)  # fmt: skip
def test_mistakes_show_before_step_one_and_write_nothing(tmp_path, changes, match):
    model = _lm()
    (tmp_path / "FILE").write_text("not a directory")
    settings = _settings(steps=2, output_dir=str(tmp_path / "runs"))
    data = changes.pop("data", DATA)
    if changes.pop("tokenizer", None):
        settings["tokenizer"] = None
    if changes.get("output_dir") == "FILE":
        changes["output_dir"] = str(tmp_path / "FILE")
    weights = _trainable(model)
    with pytest.raises(UsageError, match=match):
        jl.train(model, data, background=False, **{**settings, **changes})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"] and _same(weights, _trainable(model))
    assert jl.last_run(model) is None


def test_ctrl_c_in_a_foreground_run_stops_it_with_a_checkpoint(tmp_path):
    model = _lm()

    from jupyter_lora.core import runs
    from jupyter_lora.core.modelinfo import base_model_of

    def interrupt(event):
        if event.kind == "step" and event.step == 3:
            # Hold the training thread until the main thread has turned Ctrl-C into a stop. Python drops a
            # KeyboardInterrupt that lands in a finalizer (gc), so press again after a while, as a user would.
            run = runs.active_run(base_model_of(model))
            for _ in range(10):
                _thread.interrupt_main()
                deadline = time.monotonic() + 2
                while not run.stop_requested.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if run.stop_requested.is_set():
                    break

    run = jl.train(model, DATA, steps=200, output_dir=str(tmp_path), observers=[interrupt], background=False,
                   **_settings())  # fmt: skip
    assert run.state == "stopped" and run.checkpoint is not None and run.step < 200
    assert (run.checkpoint / "adapter_model.safetensors").exists()
    again = jl.train(
        model, DATA, steps=1, output_dir=str(tmp_path / "again"), background=False, **_settings()
    )
    assert again.state == "finished"


def test_wandb_offline_writes_its_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-home").mkdir()
    jl.train(_lm(), DATA, steps=2, output_dir=str(tmp_path / "out"), background=False, report_to="wandb",
             run_name="lora-r8", **_settings())  # fmt: skip
    runs = list((tmp_path / "wandb-home").rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].rglob("*"))


def test_trackio_writes_its_local_store(tmp_path):
    pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR when imported: a process of its own
    code = (
        "import jupyter_lora as jl\n"
        "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
        "model = jl.inject(tiny_model('llama'), r=8)\n"
        f"run = jl.train(model, {DATA!r}, steps=2, batch=4, eval=0, tokenizer=tiny_tokenizer(), "
        f"output_dir={str(tmp_path / 'out')!r}, background=False, report_to='trackio', run_name='lora-r8')\n"
        "assert run.state == 'finished', run\n"
    )
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (db,) = (tmp_path / "store").glob("*.db")
    with sqlite3.connect(db) as con:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert "metrics" in tables
        logged = con.execute("SELECT run_name, metrics FROM metrics").fetchall()
    assert {name for name, _ in logged} == {"lora-r8"}
    assert any("train/loss" in json.loads(metrics) for _, metrics in logged)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"trainer_args": {"max_steps": 7}}, "training settings already set"),
     ({"trainer_args": {"learning_rate": 0.5}}, "training settings already set"),
     ({"trainer_args": {"eval_strategy": "steps"}}, "training settings already set"),
     ({"trainer_args": {"adam_beta1": 2.0}}, "could not be set up|do not fit together|before the first step"),
     ({"callbacks": [42]}, "`callbacks` must be"),
     ({"trainer_args": {"adam_beta2": float("nan")}}, "failed before the first step")],
    ids=["max-steps", "learning-rate", "eval-without-data", "beta-above-one", "callback-not-a-callback", "nan-beta"],
)  # fmt: skip
def test_trainer_mistakes_are_one_line_and_change_nothing(tmp_path, changes, match):
    model = _lm()
    weights = _trainable(model)
    with pytest.raises(UsageError, match=match) as excinfo:
        jl.train(
            model,
            DATA,
            steps=2,
            output_dir=str(tmp_path / "runs"),
            background=False,
            **_settings(),
            **changes,
        )
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "runs").exists() and _same(weights, _trainable(model))
    assert jl.train(
        model, DATA, steps=1, output_dir=str(tmp_path / "ok"), background=False, **_settings()
    ).state == ("finished")


def test_only_one_of_several_simultaneous_starts_trains(tmp_path):
    model = _lm()
    started, refused = [], []
    barrier = threading.Barrier(4)

    def start(i):
        barrier.wait()
        try:
            started.append(jl.train(model, DATA, steps=3, output_dir=str(tmp_path / str(i)), **_settings()))
        except UsageError:
            refused.append(i)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1 and len(refused) == 3
    assert started[0].wait(120).state == "finished"


def test_stop_and_wait_return_after_the_training_thread_ended(tmp_path):
    run = jl.train(_lm(), DATA, steps=200, output_dir=str(tmp_path), **_settings())
    run.stop(wait=True)
    assert run.state == "stopped" and not run.thread.is_alive()


def test_a_log_history_that_is_not_numbers_does_not_break_resume(tmp_path):
    model = _lm()
    run = jl.train(model, DATA, steps=2, output_dir=str(tmp_path), background=False, **_settings())
    state = json.loads((run.checkpoint / "trainer_state.json").read_text())
    state["log_history"].append({"step": 1, "loss": "x"})
    (run.checkpoint / "trainer_state.json").write_text(json.dumps(state))
    assert jl.resume(model, steps=3, background=False).state == "finished"


def test_resume_with_new_data_keeps_the_run_tokenizer(tmp_path):
    model = _lm()
    jl.train(model, DATA, steps=2, output_dir=str(tmp_path), background=False, **_settings())
    more = jl.resume(model, data=DATA[:20], steps=3, background=False)  # no tokenizer given: the run's own
    assert more.state == "finished" and more.step == 3
