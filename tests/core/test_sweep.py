"""Sweeps on CPU with tiny models: the table's numbers are those of lone runs, the base comes back bit for bit,
a failing run is recorded and the sweep goes on, stop + resume gives the uninterrupted table, keep best/all/none,
and bad keys are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.sweep import text_observer
from jupyter_lora.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

TEXT = ["the quick brown fox jumps over the lazy dog."] * 24
SHARED = dict(steps=4, lr=3e-3, batch=4, eval=8, eval_every=2, seq=32, r=4, num_virtual_tokens=4)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


class Bases:
    """An observer that records the base's state at each run's start (before the run's method is put on)."""

    def __init__(self, base):
        self.base, self.states, self.events = base, [], []

    def __call__(self, event):
        self.events.append(event)
        if event.kind == "run_start":
            self.states.append(_state(self.base))


def test_six_runs_three_methods_match_lone_runs_and_restore_the_base(tmp_path):
    model = tiny_model("llama")
    before = _state(model)
    seen = Bases(model)
    lines = []
    sw = jl.sweep(model, TEXT, grid={"method": ["lora", "loha"], "r": [4, 8]},
                  runs=None, tokenizer=tiny_tokenizer(), keep="none", output_dir=tmp_path / "s",
                  observers=[seen, text_observer(lines.append)], background=False, **SHARED)  # fmt: skip
    sw2 = jl.sweep(model, TEXT, runs=[{"method": "full"}, {"method": "prompt_tuning"}], tokenizer=tiny_tokenizer(),
                   keep="none", output_dir=tmp_path / "s2", observers=[seen], background=False, **SHARED)  # fmt: skip
    rows = sw.table.rows + sw2.table.rows
    assert len(rows) == 6 and {r["method"] for r in rows} == {"lora", "loha", "full", "prompt_tuning"}
    assert all(r["status"] == "finished" for r in rows), [r["status"] for r in rows]
    # the base is the same at every run's start and after a keep="none" sweep, bit for bit
    assert len(seen.states) == 6 and all(_same(before, s) for s in seen.states)
    assert _same(before, _state(sw2.model)) and sw2.model is model
    # each row equals the same run trained alone (same seed): LoRA through jl.train, full fine-tuning through the
    # engine under it (jl.train trains adapters)
    from jupyter_lora.core.train import make_train_config, prepare_for, start_prepared

    lone = {k: v for k, v in SHARED.items() if k not in ("r", "num_virtual_tokens")}
    alone = tiny_model("llama")
    torch.manual_seed(0)
    alone = jl.inject(alone, r=4)
    run = jl.train(alone, TEXT, tokenizer=tiny_tokenizer(), output_dir=str(tmp_path / "lone-lora"),
                   background=False, **lone)  # fmt: skip
    assert rows[0]["eval_loss"] == run.evals[-1]["eval_loss"]
    assert rows[0]["trainable_params"] == alone.get_nb_trainable_parameters()[0]
    alone = tiny_model("llama").requires_grad_(True)
    config = make_train_config(**lone)
    prepared = prepare_for(alone, config, TEXT, tiny_tokenizer(), None)
    run = start_prepared(alone, prepared, config, tiny_tokenizer(), tmp_path / "lone-full", background=False)
    assert rows[4]["eval_loss"] == run.evals[-1]["eval_loss"]
    # files: each run's adapter / changed weights, and sweep.json with every row
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc["state"] == "finished" and [r["status"] for r in doc["rows"]] == ["finished"] * 4
    assert (tmp_path / "s" / rows[0]["run"] / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "s2" / rows[4]["run"] / "adapter" / "weights.safetensors").is_file()
    assert rows[4]["trainable_params"] == sum(p.numel() for p in model.parameters())
    # events: start with the plan, each run's training events tagged, a row per run, the end
    kinds = [e.kind for e in seen.events]
    assert kinds[0] == "sweep_start" and kinds[-1] == "sweep_end" and kinds.count("run_end") == 6
    assert {e.name for e in seen.events if e.kind == "train"} == {r["run"] for r in rows}
    assert any("eval loss" in line for line in lines) and "status" in lines[-3]
    assert "★" in repr(sw.table) and "<table" in sw.table._repr_html_()
    # off CUDA every adapter method's peak memory is the estimate; full fine-tuning (base weights trained) has none
    by_method = {r["method"]: r for r in rows}
    for method in ("lora", "loha", "prompt_tuning"):
        row = by_method[method]
        assert row["memory_source"] == "estimate" and row["peak_memory"] > 0, method
    assert by_method["full"]["peak_memory"] is None


def test_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    model = tiny_model("llama")
    before = _state(model)
    # the first run's targets name no module: its inject fails when the run starts, the next run goes on
    sw = jl.sweep(model, TEXT, runs=[{"targets": "no_such_proj"}, {"targets": "q_proj"}], tokenizer=tiny_tokenizer(),
                  keep="none", output_dir=tmp_path / "s", background=False, **SHARED)  # fmt: skip
    first, second = sw.table.rows
    assert first["status"].startswith("failed: ") and "no_such_proj" in first["status"]
    assert "\n" not in first["status"]
    assert second["status"] == "finished" and second["eval_loss"] is not None
    assert _same(before, _state(model))


def test_stop_then_resume_gives_the_uninterrupted_table(tmp_path):
    settings = dict(SHARED, steps=6, eval_every=3)
    grid = {"r": [4, 8], "method": ["lora"]}
    full = jl.sweep(tiny_model("llama"), TEXT, grid=grid, tokenizer=tiny_tokenizer(), keep="none",
                    output_dir=tmp_path / "a", background=False, **settings).table  # fmt: skip
    model = tiny_model("llama")

    def stopper(event):
        inner = event.data.get("event")
        if event.kind == "train" and event.index == 0 and inner.kind == "step" and inner.step == 2:
            sw.stop(wait=False)

    sw = jl.sweep(model, TEXT, grid=grid, tokenizer=tiny_tokenizer(), keep="none", output_dir=tmp_path / "b",
                  observers=[stopper], background=True, **settings)  # fmt: skip
    sw.wait(120)
    assert sw.state == "stopped"
    assert [r["status"] for r in sw.table.rows] == ["stopped", "not run"]
    again = jl.resume_sweep(model, background=False)
    assert [r["status"] for r in again.table.rows] == ["finished", "finished"]
    for a, b in zip(full.rows, again.table.rows, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["trainable_params"] == a["trainable_params"]


def test_keep_best_all_and_the_head_method(tmp_path):
    model = tiny_model("bert")
    head_params = sum(p.numel() for p in model.classifier.parameters())
    data = [{"text": "good " * 3, "label": 1}, {"text": "bad " * 3, "label": 0}] * 12
    settings = dict(steps=4, lr=1e-2, batch=8, eval=8, eval_every=2, seq=32)
    sw = jl.sweep(model, data, grid={"method": ["lora", "head"]}, runs=[{"r": 2}, {"r": 4}], tokenizer=tiny_tokenizer(),
                  keep="all", output_dir=tmp_path / "s", background=False, **settings)  # fmt: skip
    rows = sw.table.rows
    # r does not apply to head: its two runs are one
    assert [r["status"] for r in rows] == ["finished"] * 3 and sw.table.metric == "accuracy"
    head = [r for r in rows if r["method"] == "head"]
    assert len(head) == 1 and all(r["trainable_params"] == head_params for r in head)
    status = jl.status(sw.model)
    assert sorted(a.name for a in status.adapters) == sorted(r["run"] for r in rows if r["method"] == "lora")
    assert set(sw.not_kept) == {r["run"] for r in head}
    model2 = tiny_model("bert")
    best = jl.sweep(model2, data, runs=[{"method": "head"}], tokenizer=tiny_tokenizer(), keep="best",
                    output_dir=tmp_path / "t", background=False, **settings)  # fmt: skip
    assert best.kept == [f"weights of {best.table.rows[0]['run']}"]
    assert not torch.equal(model2.classifier.weight, tiny_model("bert").classifier.weight)


def test_prompt_tuning_of_a_classifier_gives_its_head_back(tmp_path):
    # PEFT wraps a classifier's head for prompt tuning on the base itself: the next run starts from the plain head
    model = tiny_model("bert")
    before = _state(model)
    data = [{"text": "good " * 3, "label": 1}, {"text": "bad " * 3, "label": 0}] * 12
    sw = jl.sweep(model, data, runs=[{"method": "prompt_tuning"}, {"method": "ia3"}], tokenizer=tiny_tokenizer(),
                  keep="none", output_dir=tmp_path / "s", background=False, steps=2, batch=8, eval=8, seq=32,
                  num_virtual_tokens=4)  # fmt: skip
    assert sw.state == "finished" and [r["status"] for r in sw.table.rows] == ["finished"] * 2
    assert type(model.classifier).__name__ == "Linear" and _same(before, _state(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": {"rr": [4, 8]}}, "did you mean `r`"),
        ({"grid": {"method": ["lora", "fulll"]}}, "did you mean `full`"),
        ({"grid": {"method": ["head"]}}, "no fresh task head"),
        ({"grid": {"r": [4]}, "runs": [{"r": 8}]}, "in both `grid` and `runs[0]`"),
        ({"runs": [{"data": "x"}]}, "same for every run"),
        ({"keep": "bestt"}, "did you mean `best`"),
        ({"grid": {"quant": ["4bit"]}}, "CUDA GPU"),
    ],
    ids=[
        "unknown-key",
        "unknown-method",
        "head-on-lm",
        "grid-and-run",
        "data-in-run",
        "keep",
        "quant-no-cuda",
    ],
)
def test_bad_sweeps_are_one_line_errors_that_change_nothing(tmp_path, kwargs, message):
    if "quant" in str(kwargs) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(UsageError, match=None) as info:
        jl.sweep(
            model, TEXT, tokenizer=tiny_tokenizer(), output_dir=tmp_path / "s", background=False, **kwargs
        )
    assert message.lower() in str(info.value).lower() and "\n" not in str(info.value)
    assert _same(before, _state(model)) and not (tmp_path / "s").exists()


def test_merge_refuses_prompt_tuning_and_merges_ia3(tmp_path):
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    prompt = get_peft_model(
        tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(UsageError, match="adds virtual tokens; there are no weights to merge into"):
        jl.merge(prompt)
    assert jl.status(prompt).adapters[0].variant == "prompt_tuning"
    assert jl.save(prompt, tmp_path / "p").joinpath("adapter_model.safetensors").is_file()
    ia3 = get_peft_model(tiny_model("llama"), IA3Config(task_type="CAUSAL_LM"))
    assert jl.status(ia3).trainable_params == ia3.get_nb_trainable_parameters()[0]
    assert type(jl.merge(ia3)).__name__ == "LlamaForCausalLM"


def test_a_head_runs_saved_weights_load_into_a_fresh_base_and_another_model_is_refused(tmp_path):
    """`jupyter_lora.load(model, <run>/adapter)` on a full or head run's folder (weights.safetensors, no adapter
    config) puts the weights it changed into the base; weights of another shape change nothing."""
    model = tiny_model("bert")
    data = [{"text": "good " * 3, "label": 1}, {"text": "bad " * 3, "label": 0}] * 12
    sw = jl.sweep(model, data, runs=[{"method": "head"}], tokenizer=tiny_tokenizer(), keep="best", steps=4, lr=1e-2,
                  batch=8, eval=8, seq=32, output_dir=tmp_path / "s", background=False)  # fmt: skip
    folder = tmp_path / "s" / sw.table.rows[0]["run"] / "adapter"
    fresh = tiny_model("bert")
    loaded = jl.load(fresh, folder)
    assert loaded is fresh and torch.equal(fresh.classifier.weight, sw.model.classifier.weight)
    other = tiny_model("bert", hidden_size=48)
    before = _state(other)
    with pytest.raises(jl.UsageError, match=r"holds weights of another model"):
        jl.load(other, folder)
    assert _same(before, _state(other))
