"""``jupyter_lora.runs``: the runs and checkpoints on disk, read from the checkpoints' own trainer_state.json — for a
model (its last run, its runs in lora_runs/), a directory, or nothing; damaged and foreign directories listed with
a one-word reason; the listing writes nothing; its rows resume and load."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest

import jupyter_lora as jl
from jupyter_lora.core import runs as run_registry
from jupyter_lora.core.errors import UsageError
from jupyter_lora.display import load_code, resume_code, runs_html, runs_text
from jupyter_lora.testing import tiny_model, tiny_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog."] * 24
pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")


def _lm(name="default"):
    return jl.inject(tiny_model("llama"), r=4, targets="q_proj, v_proj", name=name)


def _train(model, **settings):
    settings = {
        "steps": 6,
        "batch": 4,
        "lr": 3e-3,
        "eval": 0.25,
        "eval_every": 3,
        "save_every": 3,
        **settings,
    }
    return jl.train(model, TEXT, tokenizer=tiny_tokenizer(), background=False, **settings)


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Runs without an output_dir go to ./lora_runs: here, a temporary directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_models_runs_and_their_checkpoints(in_tmp):
    model = _lm()
    first = _train(model)  # lora_runs/llama-<time>
    second = _train(model, output_dir="elsewhere/b", steps=4, save_every=None, eval=0)
    listing = jl.runs(model)
    assert listing.run_dirs == [Path("elsewhere/b"), first.output_dir]
    rows = listing.checkpoints
    assert [(r.run, r.step) for r in rows] == [
        (second.output_dir, 4),
        (first.output_dir, 3),
        (first.output_dir, 6),
    ]
    for row in rows:
        state = json.loads((row.checkpoint / "trainer_state.json").read_text())
        logged = [e for e in state["log_history"] if "loss" in e and e["step"] <= row.step]
        assert row.train_loss == pytest.approx(logged[-1]["loss"])
        assert row.written == (row.checkpoint / "trainer_state.json").stat().st_mtime
        assert row.size == sum(p.stat().st_size for p in row.checkpoint.rglob("*") if p.is_file())
        assert row.adapter == row.checkpoint and row.adapter_name is None
    # the eval loss of each checkpoint is the one the run logged at or before it
    assert [r.eval_loss for r in rows[1:]] == pytest.approx([e["eval_loss"] for e in first.evals])
    assert rows[0].eval_loss is None  # the second run held out no data
    assert listing.latest == rows[0]


def test_another_models_runs_are_not_listed_for_it(in_tmp):
    _train(_lm())
    gpt2 = jl.inject(tiny_model("gpt2"), r=4, targets="c_attn")
    assert jl.runs(gpt2).rows == ()
    # everything in lora_runs/ (the listing also holds the runs of this session's other models, elsewhere)
    here = [
        c for c in jl.runs().checkpoints if (in_tmp.resolve() / "lora_runs") in c.checkpoint.resolve().parents
    ]
    assert len(here) == 2


def test_a_run_directory_a_directory_of_runs_and_a_checkpoint(in_tmp):
    _train(_lm(), output_dir="exp/a")
    _train(_lm(), output_dir="exp/b", steps=3)
    assert [r.step for r in jl.runs("exp/a").rows] == [3, 6]
    assert {(r.run.name, r.step) for r in jl.runs("exp").rows} == {("a", 3), ("a", 6), ("b", 3)}
    only = jl.runs(Path("exp/a/checkpoint-3"))
    assert [(r.run, r.step) for r in only.rows] == [(Path("exp/a"), 3)]


def _damage(root: Path) -> None:
    """Next to a good run: each way a directory can fail to be a run, or a checkpoint fail to be readable."""
    good = root / "good" / "checkpoint-6"
    for name, change in {
        "damaged": lambda c: (c / "trainer_state.json").write_text("{not json"),
        "foreign": lambda c: (c / "trainer_state.json").write_text(json.dumps({"hello": 1})),
        "incomplete": lambda c: (c / "trainer_state.json").unlink(),
        "no-adapter": lambda c: (c / "adapter_model.safetensors").unlink(),
    }.items():
        copy = root / name / "checkpoint-6"
        copy.mkdir(parents=True)
        for f in good.iterdir():
            if f.is_file():
                (copy / f.name).write_bytes(f.read_bytes())
        change(copy)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "empty").mkdir()
    (root / "readme.txt").write_text("a file is not a run")


def test_damaged_and_foreign_directories_get_a_one_word_reason(in_tmp):
    _train(_lm(), output_dir="exp/good")
    _damage(in_tmp / "exp")
    before = _snapshot(in_tmp / "exp")
    listing = jl.runs("exp")
    assert _snapshot(in_tmp / "exp") == before, "listing writes nothing"
    problems = {r.run.name: r.problem for r in listing.rows if r.problem}
    assert problems == {"damaged": "damaged", "foreign": "foreign", "incomplete": "incomplete",
                        "no-adapter": "no-adapter", "notes": "foreign", "empty": "empty"}  # fmt: skip
    assert [r.step for r in listing.checkpoints] == [3, 6]
    assert listing.run_dirs[0] == Path("exp/good")  # runs with a usable checkpoint first
    assert all(not r.usable for r in listing.rows if r.problem)
    text, html = runs_text(listing), runs_html(listing)
    for word in ("damaged", "foreign", "incomplete", "no-adapter", "empty"):
        assert word in text and word in html
    assert html.count("user-select:all") == 4  # resume and load code for the 2 usable checkpoints only


def test_a_deleted_run_of_the_model_is_listed_missing(in_tmp):
    model = _lm()
    run = _train(model, output_dir="gone")
    for path in sorted(run.output_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    run.output_dir.rmdir()
    (row,) = jl.runs(model).rows
    assert (row.run, row.problem) == (Path("gone"), "missing")


def test_the_rows_resume_and_load(in_tmp):
    model = _lm()
    _train(model, output_dir="exp/a")
    listing = jl.runs("exp/a", variable="net")
    row = listing.checkpoints[0]  # checkpoint-3
    assert resume_code(row, "net") == "%lora resume net exp/a/checkpoint-3"
    assert load_code(row, "net") == "%lora load net exp/a/checkpoint-3"
    assert "%lora resume net exp/a/checkpoint-3" in runs_html(listing)
    fresh = jl.load(_lm(), row.adapter)
    assert jl.status(fresh).adapters
    resumed = jl.resume(model, row.checkpoint, background=False)
    assert resumed.state == "finished" and resumed.step == 6


def test_an_adapter_of_another_name_is_loaded_from_its_folder(in_tmp):
    _train(_lm(name="chat"), output_dir="exp/chat", steps=3)
    (row,) = jl.runs("exp/chat").rows
    assert row.usable and row.adapter == Path("exp/chat/checkpoint-3/chat") and row.adapter_name == "chat"
    assert load_code(row) == "%lora load model exp/chat/checkpoint-3/chat --name chat"
    loaded = jl.load(_lm(name="chat"), row.adapter, name="chat")
    assert "chat" in [a.name for a in jl.status(loaded).adapters]


def test_paths_with_spaces_are_quoted_in_the_code(in_tmp):
    _train(_lm(), output_dir="my runs/a b", steps=3)
    (row,) = jl.runs("my runs/a b").rows
    assert resume_code(row) == "%lora resume model 'my runs/a b/checkpoint-3'"


def test_without_an_argument_this_sessions_runs_and_lora_runs(in_tmp, monkeypatch):
    monkeypatch.setattr(run_registry, "_LAST", weakref.WeakKeyDictionary())  # a new session
    listing = jl.runs()
    assert listing.rows == () and "No runs in lora_runs" in runs_text(listing)
    _train(_lm(), output_dir="exp/a", steps=3)
    _train(_lm(), steps=3)
    assert {(r.run.parent, r.step) for r in jl.runs().rows} == {(Path("exp"), 3), (Path("lora_runs"), 3)}


def test_nothing_on_disk_is_an_empty_list(in_tmp, monkeypatch):
    monkeypatch.setattr(run_registry, "_LAST", weakref.WeakKeyDictionary())
    listing = jl.runs()
    assert listing.rows == () and "No runs in lora_runs" in runs_text(listing)


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("nowhere", r"`path` 'nowhere' does not exist; give a run directory"),
        ("file.txt", r"`path` 'file.txt' is a file"),
        (3, r"`path_or_model` must be a model, a directory or None, got int"),
    ],
    ids=["missing-path", "a-file", "wrong-type"],
)
def test_bad_input_is_one_line(in_tmp, arg, match):
    (in_tmp / "file.txt").write_text("x")
    with pytest.raises(UsageError, match=match) as info:
        jl.runs(arg)
    assert "\n" not in str(info.value)


def test_the_variable_must_be_a_name(in_tmp):
    with pytest.raises(UsageError, match="`variable` must be a variable name"):
        jl.runs(variable="not a name")
