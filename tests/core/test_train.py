"""The training engine on CPU with tiny models: it learns, stops and resumes exactly, survives OOM, checkpoints
atomically, and reports events."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.settings import OPTIMIZERS
from jupyter_lora.testing import tiny_model, tiny_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog."] * 16
# Tiny random models need a higher learning rate than LoRA on a pretrained model; the warning is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def kinds(self):
        return [e.kind for e in self.events]

    def of(self, kind):
        return [e for e in self.events if e.kind == kind]


def _lm(targets="all-linear, lm_head"):
    return jl.inject(tiny_model("llama"), r=8, targets=targets)


def test_causal_lm_loss_decreases(tmp_path):
    rec = Recorder()
    run = jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), steps=30, lr=3e-3, batch=4, eval=0, observers=rec,
                   scheduler="constant", warmup=0, output_dir=str(tmp_path), background=False)  # fmt: skip
    losses = [h["loss"] for h in run.history]
    assert len(losses) == 30 and run.state == "finished"
    assert losses[-1] < 0.5 * losses[0]
    kinds = rec.kinds()
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 30
    start = rec.of("start")[0].data
    assert start["total_steps"] == 30 and start["examples"] == 16
    step = rec.of("step")[-1].data
    assert step["tokens_per_s"] > 0 and step["memory_allocated"] is None
    end = rec.of("end")[0].data
    assert end["steps"] == 30 and end["checkpoint"]


def test_runs_in_background_and_returns_at_once(tmp_path):
    run = jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), steps=20, lr=1e-3, batch=2, eval=0,
                   output_dir=str(tmp_path))  # fmt: skip
    assert not run.done or run.state == "finished"
    run.wait(60)
    assert run.done and run.state == "finished" and run.step == 20
    assert jl.last_run(run.model) is run


def test_classification_learns_and_reports_accuracy(tmp_path):
    model = jl.inject(tiny_model("bert"), r=8, targets="all-linear")
    data = [{"text": "good " * 3, "label": 1}, {"text": "bad " * 3, "label": 0}] * 20
    rec = Recorder()
    run = jl.train(model, data, tokenizer=tiny_tokenizer(), steps=40, lr=1e-2, batch=8, eval=8, eval_every=20,
                   observers=rec, output_dir=str(tmp_path), background=False)  # fmt: skip
    assert run.evals and run.evals[-1]["accuracy"] == 1.0
    assert rec.of("eval")[-1].data["accuracy"] == 1.0
    assert run.history[-1]["loss"] < run.history[0]["loss"]


def test_string_labels_train_a_fresh_classifier_and_name_its_classes(tmp_path):
    """A classifier built without label names (transformers' LABEL_0, LABEL_1, ...) trains on text labels; the
    run names its classes with them, so predictions and compare read "neg"/"pos" instead of LABEL_i."""
    model = jl.inject(tiny_model("bert"), r=8, targets="all-linear")
    data = [{"text": "good " * 3, "label": "pos"}, {"text": "bad " * 3, "label": "neg"}] * 20
    tok = tiny_tokenizer()
    run = jl.train(model, data, tokenizer=tok, steps=30, lr=1e-2, batch=8, eval=0, output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.state == "finished"
    config = model.base_model.model.config
    assert [config.id2label[i] for i in range(2)] == ["neg", "pos"]
    assert config.label2id["pos"] == 1
    shown = jl.compare(model, "good good good", tokenizer=tok)
    assert shown.labels[:2] == ("neg", "pos") and shown.adapter == "pos"


def test_labels_setting_names_whole_number_classes(tmp_path):
    model = jl.inject(tiny_model("bert"), r=8, targets="all-linear")
    data = [{"text": "good " * 3, "label": 1}, {"text": "bad " * 3, "label": 0}] * 4
    jl.train(model, data, tokenizer=tiny_tokenizer(), steps=2, eval=0, labels="negative, positive",
             output_dir=str(tmp_path), background=False)  # fmt: skip
    assert model.base_model.model.config.id2label[1] == "positive"


def test_named_classes_of_the_model_decide_the_ids(tmp_path):
    base = tiny_model("bert")
    base.config.id2label = {0: "neg", 1: "pos", 2: "neutral"}
    base.config.label2id = {"neg": 0, "pos": 1, "neutral": 2}
    model = jl.inject(base, r=8, targets="all-linear")
    data = [{"text": "meh " * 3, "label": "neutral"}, {"text": "bad " * 3, "label": "neg"}] * 4
    run = jl.train(model, data, tokenizer=tiny_tokenizer(), steps=2, eval=0, output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.data.label_names == ("neg", "pos", "neutral")
    assert base.config.id2label[2] == "neutral"


@pytest.mark.parametrize(
    ("labels", "match"),
    [(["a", "a"], "distinct"), ([], "class names in id order"), (5, "class names in id order")],
)
def test_bad_labels_setting(tmp_path, labels, match):
    model = jl.inject(tiny_model("bert"), r=8, targets="all-linear")
    with pytest.raises(UsageError, match=match):
        jl.train(model, [{"text": "a", "label": 0}] * 4, tokenizer=tiny_tokenizer(), labels=labels, steps=1,
                 output_dir=str(tmp_path), background=False)  # fmt: skip
    assert model.base_model.model.config.id2label[0] == "LABEL_0"


def test_more_classes_than_the_head_holds_are_refused_before_the_run(tmp_path):
    """A class id beyond the classifier head failed at the first step ("Target 7 is out of bounds"), and the data
    preview showed the classes without a word; both now refuse with the head's size."""
    model = jl.inject(tiny_model("bert"), r=4, targets="all-linear")  # 3 classes
    data = [{"text": "x", "label": 7}, {"text": "y", "label": 0}]
    for call in (jl.train, jl.preview_data):
        with pytest.raises(
            UsageError, match=r"8 classes .* classifier head has 3 \(LABEL_0, LABEL_1, LABEL_2\)"
        ):
            call(model, data, tokenizer=tiny_tokenizer(), steps=2, output_dir=str(tmp_path))
    assert not (tmp_path / "checkpoint-1").exists()


def test_labels_mixing_ids_and_names_are_refused(tmp_path):
    model = jl.inject(tiny_model("bert"), r=4, targets="all-linear")
    data = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": 5}]
    with pytest.raises(UsageError, match=r"labels mix class ids \(5\) and names \('neg', 'pos'\)"):
        jl.train(model, data, tokenizer=tiny_tokenizer(), steps=2, output_dir=str(tmp_path))


def test_labels_setting_is_for_classifiers(tmp_path):
    with pytest.raises(UsageError, match="names the classes of a classifier"):
        jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), labels=["a", "b"], steps=1, output_dir=str(tmp_path),
                 background=False)  # fmt: skip


def _stop_at(k):
    def observer(event):
        if event.kind == "step" and event.step == k:
            observer.run.stop(wait=False)

    return observer


def test_stop_then_resume_reproduces_the_uninterrupted_curve(tmp_path):
    settings = dict(steps=12, lr=2e-3, batch=4, eval=0, seed=3, warmup=2, tokenizer=tiny_tokenizer())
    data = [f"sample {i}: " + "abcdefghij"[: 3 + i % 7] for i in range(40)]
    full = jl.train(_lm(), data, output_dir=str(tmp_path / "a"), background=False, **settings)
    reference = [h["loss"] for h in full.history]

    model = _lm()
    stopper = _stop_at(5)
    run = jl.train(model, data, output_dir=str(tmp_path / "b"), observers=stopper, **settings)
    stopper.run = run
    run.wait(60)
    assert run.state == "stopped" and run.step == 5
    # the Trainer's own checkpoint: adapter (PEFT format) and trainer_state.json at its top
    assert run.checkpoint is not None and (run.checkpoint / "adapter_model.safetensors").exists()
    state = json.loads((run.checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and run.checkpoint.name == "checkpoint-5"

    resumed = jl.resume(model, background=False)
    assert resumed.step == 12 and resumed.state == "finished"
    curve = [h["loss"] for h in resumed.history]
    assert len(curve) == 12
    assert curve == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_resume_from_a_checkpoint_into_a_fresh_model(tmp_path):
    settings = dict(steps=8, lr=2e-3, batch=4, eval=0, seed=1, tokenizer=tiny_tokenizer(), save_every=4)
    full = jl.train(_lm(), TEXT, output_dir=str(tmp_path / "a"), background=False, **settings)
    part = jl.train(_lm(), TEXT, output_dir=str(tmp_path / "b"), background=False, **{**settings, "steps": 8})
    ckpt = tmp_path / "b" / "checkpoint-4"
    assert ckpt.exists()
    fresh = _lm()
    resumed = jl.resume(fresh, ckpt, data=TEXT, tokenizer=tiny_tokenizer(), background=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    assert part.step == 8


def test_resume_into_a_model_without_an_adapter_says_to_load_the_checkpoints_first(tmp_path):
    jl.train(
        _lm(), TEXT, tokenizer=tiny_tokenizer(), steps=2, eval=0, output_dir=str(tmp_path), background=False
    )
    bare = tiny_model("llama")
    with pytest.raises(
        UsageError, match=r"holds no adapter yet; the checkpoint's adapter comes first: %lora load"
    ):
        jl.resume(bare, tmp_path / "checkpoint-2", data=TEXT)
    # the run's directory stands for its latest checkpoint: the same advice, with that checkpoint's path
    with pytest.raises(UsageError, match=r"holds no adapter yet; .*: %lora load model (\S+) ") as err:
        jl.resume(bare, tmp_path, data=TEXT)
    assert f"%lora load model {tmp_path / 'checkpoint-2'} " in str(err.value)


def test_a_refusal_during_a_runs_start_does_not_read_step_0_of_0():
    from jupyter_lora.core import runs

    model = _lm()

    class Starting:  # registered, steps not yet counted
        done, step, total_steps = False, 0, 0

    assert runs.register(model, Starting())
    try:
        with pytest.raises(
            UsageError, match=r"while this model is training \(starting\)\. Stop the run first"
        ):
            jl.merge(model)
    finally:
        runs.finish(model)


def test_simulated_out_of_memory_keeps_model_and_state(tmp_path, monkeypatch):
    model = _lm()
    rec = Recorder()
    original = type(model).forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=10, batch=4, lr=1e-3, eval=0, observers=rec,
                   output_dir=str(tmp_path), background=False)  # fmt: skip
    assert run.state == "oom" and run.step == 3
    oom = rec.of("oom")[0].data
    assert "batch: 2 with grad_accum: 2" in oom["advice"] and "ckpt: true" in oom["advice"]
    assert oom["checkpoint"] and (tmp_path / "checkpoint-3").exists()
    assert (tmp_path / "checkpoint-3" / "jupyter_lora.json").exists(), (
        "the OOM checkpoint records the settings"
    )
    monkeypatch.setattr(type(model), "forward", original)
    weights = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The kernel is alive and the model usable: training again works and the adapter is still there.
    again = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=2, batch=4, eval=0, output_dir=str(tmp_path / "2"),
                     background=False)  # fmt: skip
    assert again.state == "finished"


def test_one_training_per_model(tmp_path):
    model = _lm()
    run = jl.train(model, TEXT * 4, tokenizer=tiny_tokenizer(), steps=200, batch=2, eval=0,
                   output_dir=str(tmp_path))  # fmt: skip
    try:
        with pytest.raises(UsageError, match="already training"):
            jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=2)
    finally:
        run.stop()
    assert run.state == "stopped"


def test_early_stop_and_keep_best(tmp_path):
    model = _lm()
    rec = Recorder()
    # Eval on data unlike the training data: eval loss rises as the model overfits the training sentence.
    run = jl.train(model, TEXT * 2, eval_data=["zzzz yyyy xxxx"] * 4, tokenizer=tiny_tokenizer(), steps=60, lr=1e-2,
                   batch=4, eval_every=2, early_stop=2, observers=rec, output_dir=str(tmp_path),
                   background=False)  # fmt: skip
    assert run.state == "early_stopped" and run.step < 60
    assert rec.of("stop")[0].data["reason"] == "early_stop"
    best = min(e["eval_loss"] for e in run.evals)
    assert run.best_eval_loss == best
    # keep_best (on by default with early_stop): the model holds the best adapter, so its eval loss is the best.
    batch = run.data.collate(run.data.eval)
    model.eval()
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss.item()
    assert loss == pytest.approx(best, rel=1e-4)
    assert loss < run.evals[-1]["eval_loss"], "the last eval was worse than the best one"


def test_samples_and_checkpoint_events(tmp_path):
    rec = Recorder()
    jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), steps=6, batch=4, lr=3e-3, eval=0, samples=["the quick"],
             sample_every=3, save_every=3, max_new_tokens=5, observers=rec, output_dir=str(tmp_path),
             background=False)  # fmt: skip
    samples = rec.of("sample")
    assert [e.step for e in samples] == [3, 6]
    assert samples[0].data["samples"][0]["prompt"] == "the quick"
    checkpoints = rec.of("checkpoint")
    assert [e.data["reason"] for e in checkpoints] == ["every", "end"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_gradient_checkpointing_and_accumulation(tmp_path):
    model = _lm()
    run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=4, batch=2, grad_accum=2, ckpt=True, eval=0,
                   output_dir=str(tmp_path), background=False)  # fmt: skip
    assert run.state == "finished" and run.step == 4
    assert not model.base_model.model.is_gradient_checkpointing, "turned off again afterwards"


def test_offloaded_checkpointing_trains_the_same_curve(tmp_path):
    """``ckpt: offload`` (the checkpoints wait in host memory) computes what plain checkpointing and no
    checkpointing compute: the same losses and the same adapter."""
    curves, adapters = {}, {}
    for ckpt in (False, True, "offload"):
        torch.manual_seed(0)
        model = _lm()
        run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=4, batch=2, ckpt=ckpt, eval=0, lr=5e-3,
                       output_dir=str(tmp_path / str(ckpt)), background=False)  # fmt: skip
        assert run.state == "finished"
        curves[ckpt] = [h["loss"] for h in run.history]
        adapters[ckpt] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    np.testing.assert_allclose(curves["offload"], curves[False], rtol=1e-5)
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    for name, value in adapters["offload"].items():
        torch.testing.assert_close(value, adapters[False][name], rtol=1e-4, atol=1e-6)
    assert curves[False][-1] < curves[False][0]


def test_liger_kernels_are_refused_where_they_cannot_run(tmp_path):
    model = _lm()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(
        jl.UsageError, match=r"`kernels: liger` cannot be used here: Liger's kernels run on CUDA"
    ):
        jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=2, kernels="liger", output_dir=str(tmp_path / "x"),
                 background=False)  # fmt: skip
    assert not (tmp_path / "x").exists()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(jl.UsageError, match="Did you mean `liger`"):
        jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=2, kernels="ligre", background=False)
    run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=1, kernels="auto", eval=0,
                   output_dir=str(tmp_path / "auto"), background=False)  # fmt: skip
    assert run.state == "finished"  # auto: off here, without a word


def test_modes_and_forward_restored_after_training(tmp_path):
    model = _lm()
    model.eval()
    jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=2, batch=4, eval=0, output_dir=str(tmp_path),
             background=False)  # fmt: skip
    assert not any(m.training for m in model.modules())
    assert "forward" not in model.__dict__, "accelerate's autocast wrapper removed"


def test_observer_failure_does_not_stop_training(tmp_path):
    def broken(event):
        raise RuntimeError("display broke")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), steps=3, batch=4, eval=0, observers=[broken],
                       output_dir=str(tmp_path), background=False)  # fmt: skip
    assert run.state == "finished"
    assert sum("observer failed" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize(
    ("settings", "match"),
    [({"steps": 0}, "`steps` must be a positive"), ({"lr": -1}, "`lr` must be a positive"),
     ({"batchsize": 4}, "Did you mean `batch_size`"), ({"scheduler": "cosin"}, "Did you mean `cosine`"),
     ({"optim": "adam"}, "`optim` must be one of"), ({"precision": "fp8"}, "`precision` must be")],
    ids=["steps-zero", "negative-lr", "unknown-key", "scheduler-typo", "optim", "precision"],
)  # fmt: skip
def test_bad_settings(settings, match):
    with pytest.raises(UsageError, match=match):
        jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), **settings)


def test_lr_outside_the_usual_range_warns(tmp_path):
    with pytest.warns(UserWarning, match="outside the usual LoRA range"):
        jl.train(_lm(), TEXT, tokenizer=tiny_tokenizer(), steps=1, lr=0.05, batch=4, eval=0, output_dir=str(tmp_path),
                 background=False)  # fmt: skip


def test_training_needs_an_adapter():
    with pytest.raises(UsageError, match="no LoRA adapter to train"):
        jl.train(tiny_model("llama"), TEXT, tokenizer=tiny_tokenizer(), steps=1)


def test_resume_without_a_checkpoint_is_a_clear_error():
    with pytest.raises(UsageError, match="No checkpoint to resume from"):
        jl.resume(_lm())


def test_adapter_operations_wait_for_training_to_stop(tmp_path):
    model = _lm()
    run = jl.train(model, TEXT * 8, tokenizer=tiny_tokenizer(), steps=100000, batch=2, eval=0,
                   output_dir=str(tmp_path))  # fmt: skip
    try:
        for call in (lambda: jl.merge(model), lambda: jl.save(model, tmp_path / "x"), lambda: jl.unload(model),
                     lambda: jl.inject(model, r=2), lambda: jl.disable(model),
                     lambda: jl.compare(model, "the", tiny_tokenizer())):  # fmt: skip
            with pytest.raises(UsageError, match="while this model is training"):
                call()
    finally:
        run.stop()
    assert run.state == "stopped"
    jl.save(model, tmp_path / "after")  # fine once stopped


@pytest.mark.parametrize("optim", [o for o in OPTIMIZERS if o != "adamw"])
def test_other_optimizers_train(optim, tmp_path):
    """Every optimizer the settings offer (and `%lora estimate` accounts for) also trains."""
    if "8bit" in optim or "paged" in optim:
        pytest.importorskip("bitsandbytes")
    model = jl.inject(tiny_model("llama", hidden_size=64, intermediate_size=128), r=8, targets="all-linear")
    run = jl.train(model, TEXT, tokenizer=tiny_tokenizer(), steps=4, batch=4, eval=0, optim=optim, lr=1e-3,
                   output_dir=str(tmp_path), background=False)  # fmt: skip
    losses = [h["loss"] for h in run.history]
    assert run.state == "finished" and losses[-1] < losses[0]
