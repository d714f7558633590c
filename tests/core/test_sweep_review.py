"""Sweeps: data fingerprint on resume, settings a method does not use, a busy model, a damaged sweep.json, the
label of "best" without eval data, the entry a bad value came from."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.sweep import grid, text_observer
from jupyter_lora.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

TEXT = ["the quick brown fox jumps over the lazy dog."] * 24
OTHER = ["a completely different sentence about cats and hats."] * 24
QUICK = dict(steps=1, lr=3e-3, batch=4, eval=8, seq=32)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_with_other_data_is_refused(tmp_path):
    model = tiny_model("llama")
    jl.sweep(model, TEXT, grid={"r": [2, 4]}, tokenizer=tiny_tokenizer(), keep="none", output_dir=tmp_path / "s",
             background=False, **QUICK)  # fmt: skip
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert doc["data"]["train"] == 16 and doc["data"]["eval"] == 8 and len(doc["data"]["hash"]) == 64
    with pytest.raises(UsageError) as info:
        jl.resume_sweep(tiny_model("llama"), tmp_path / "s", data=OTHER, tokenizer=tiny_tokenizer())
    text = str(info.value)
    assert "data differs from the sweep's" in text and "start a new sweep" in text and "\n" not in text
    again = jl.resume_sweep(tiny_model("llama"), tmp_path / "s", data=TEXT, tokenizer=tiny_tokenizer(),
                            background=False)  # fmt: skip
    assert [r["status"] for r in again.table.rows] == ["finished"] * 2


def test_settings_a_method_does_not_use_are_dropped_and_runs_merged():
    planned, note = grid.plan({"method": ["lora", "full", "ia3", "prompt_tuning"], "r": [4, 8]}, None, {})
    assert [(p.method, p.settings.get("r")) for p in planned] == [
        ("lora", 4),
        ("lora", 8),
        ("full", None),
        ("ia3", None),
        ("prompt_tuning", None),
    ]
    assert note == "r does not apply to full, ia3, prompt_tuning: 8 → 5 runs"
    assert [p.name for p in planned] == [
        "01-lora-r_4",
        "02-lora-r_8",
        "03-full",
        "04-ia3",
        "05-prompt_tuning",
    ]
    planned, note = grid.plan(
        {"num_virtual_tokens": [4, 8]}, [{"method": "lora"}, {"method": "prefix_tuning"}], {}
    )
    assert len(planned) == 3 and note == "num_virtual_tokens does not apply to lora: 4 → 3 runs"
    # LoHa's config takes r, IA3's does not
    planned, note = grid.plan({"method": ["loha", "ia3"], "r": [2, 4]}, None, {})
    assert len(planned) == 3 and note == "r does not apply to ia3: 4 → 3 runs"


def test_the_table_shows_a_dash_for_a_setting_the_method_does_not_use(tmp_path):
    model = tiny_model("llama")
    events = []
    sw = jl.sweep(model, TEXT, grid={"method": ["lora", "full"], "r": [2, 4]}, tokenizer=tiny_tokenizer(),
                  keep="none", output_dir=tmp_path / "s", observers=[events.append], background=False,
                  **QUICK)  # fmt: skip
    assert len(sw.table.rows) == 3
    assert events[0].data["note"] == "r does not apply to full: 4 → 3 runs"
    full = next(r for r in sw.table.rows if r["method"] == "full")
    text = repr(sw.table)
    line = next(line for line in text.splitlines() if full["run"] in line)
    assert " — " in line and "r does not apply to full" in text


def test_a_running_sweep_refuses_a_second_sweep_and_adapter_operations(tmp_path):
    model = tiny_model("llama")
    stepping, release = threading.Event(), threading.Event()

    def hold(event):
        inner = event.data.get("event")
        if event.kind == "train" and inner.kind == "step":
            stepping.set()
            release.wait(60)

    jl.save(jl.inject(tiny_model("llama"), r=2), tmp_path / "a")
    sw = jl.sweep(model, TEXT, grid={"r": [2, 4]}, tokenizer=tiny_tokenizer(), keep="none",
                  output_dir=tmp_path / "s", observers=[hold], background=True, **dict(QUICK, steps=3))  # fmt: skip
    try:
        assert stepping.wait(60)
        held = model  # the base the sweep is training
        calls = [
            lambda: jl.sweep(
                held, TEXT, grid={"r": [2]}, tokenizer=tiny_tokenizer(), output_dir=tmp_path / "t"
            ),
            lambda: jl.unload(held),
            lambda: jl.merge(held),
            lambda: jl.load(held, tmp_path / "a"),
        ]
        for call in calls:
            with pytest.raises(UsageError) as info:
                call()
            assert "a sweep is running on this model" in str(info.value), str(info.value)
            assert "Stop the sweep first" in str(info.value) and "holds an adapter" not in str(info.value)
    finally:
        release.set()
        sw.stop(wait=True, timeout=120)


@pytest.mark.parametrize(
    "doc",
    [{}, "rows-short", "wrong-types", [1, 2]],
    ids=["empty", "rows-short", "wrong-types", "a-list"],
)
def test_a_damaged_sweep_json_is_one_line(tmp_path, doc):
    good = {"state": "stopped", "keep": "none", "metric": "eval_loss", "varying": ["r"], "train_settings": {},
            "planned": [{"index": 0, "name": "01-lora-r_2", "settings": {"r": 2}},
                        {"index": 1, "name": "02-lora-r_4", "settings": {"r": 4}}],
            "rows": [{"run": "01-lora-r_2", "status": "stopped"}, {"run": "02-lora-r_4", "status": "not run"}]}  # fmt: skip
    if doc == "rows-short":
        doc = dict(good, rows=good["rows"][:1])
    elif doc == "wrong-types":
        doc = dict(good, planned=[{"index": "0", "name": 3, "settings": []}] * 2)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(doc))
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(UsageError) as info:
        jl.resume_sweep(model, tmp_path / "s", data=TEXT, tokenizer=tiny_tokenizer())
    text = str(info.value)
    assert (
        "sweep.json in" in text and "is damaged:" in text and "start a new sweep" in text and "\n" not in text
    )
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_best_without_eval_data_says_it_is_by_training_loss(tmp_path):
    from jupyter_lora.widgets.sweep import SweepBoard

    board, lines, ends = SweepBoard(), [], []

    def observe(event):
        board.record(event)
        if event.kind == "sweep_end":
            ends.append(event.data)

    sw = jl.sweep(tiny_model("llama"), TEXT, grid={"r": [2, 4]}, tokenizer=tiny_tokenizer(), keep="none",
                  output_dir=tmp_path / "s", observers=[observe, text_observer(lines.append)], background=False,
                  **dict(QUICK, eval=0))  # fmt: skip
    label = "best by training loss (no eval split)"
    assert sw.table.best is not None and sw.table.best_label == label
    assert label in repr(sw.table) and label in sw.table._repr_html_()
    assert ends[0]["best_by"] == label
    assert label in board.table_html() and "Best by training loss (no eval split)" in board.note_text()
    assert "eval loss" not in board.table_html().split("<caption")[1].split("</caption>")[0]
    assert any(label in line for line in lines)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runs": [{"r": 4}, {"r": -1}]}, "`runs[1]`: `r` must be"),
        ({"grid": {"r": [4, 8, "x"]}}, "`grid` r[2]: `r` must be"),
    ],
)
def test_a_bad_value_names_its_entry(tmp_path, kwargs, message):
    with pytest.raises(UsageError) as info:
        jl.sweep(tiny_model("llama"), TEXT, tokenizer=tiny_tokenizer(), output_dir=tmp_path / "s", **kwargs)
    assert str(info.value).startswith(message), str(info.value)
