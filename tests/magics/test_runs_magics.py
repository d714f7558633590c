"""``%lora runs [MODEL|DIR]``: its grammar alone, then in a real shell — a model variable, a directory, nothing; the
table as text and HTML; the code it shows runs as shown; mistakes are one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from IPython.core.error import UsageError as IPythonUsageError
from shell_cells import run as _cell

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.magics.parse import USAGE, Runs, parse

pytestmark = pytest.mark.filterwarnings("ignore:lr=.*outside the usual LoRA range")

SETUP = (
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "import jupyter_lora as jl\n"
    "model = jl.inject(tiny_model('llama'), r=4, targets='q_proj, v_proj')\n"
    "tok = tiny_tokenizer()\n"
    "texts = ['the quick brown fox jumps over the lazy dog.'] * 16\n"
)

# ----------------------------------------------------------------------------------------------- grammar

VALID = [
    ("bare", "runs", Runs()),
    ("model", "runs model", Runs("model")),
    ("directory", "runs lora_runs/llama-1", Runs("lora_runs/llama-1")),
    ("quoted-directory", "runs 'my runs/a'", Runs("my runs/a")),
    ("comment", "runs model  # the table", Runs("model")),
]


@pytest.mark.parametrize(("line", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_spellings(line, expected):
    assert parse(line) == expected


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("runs a b", r"%lora runs: unrecognized arguments: b\. Usage: %lora runs \[MODEL\|DIR\]"),
        ("runs --all", r"%lora runs: unrecognized arguments: --all"),
        ("rusn model", r"unknown subcommand 'rusn'.*Did you mean `runs`\?"),
    ],
    ids=["two-targets", "unknown-option", "misspelled"],
)
def test_invalid_spellings(line, pattern):
    with pytest.raises(UsageError, match=pattern):
        parse(line)


def test_help_describes_it():
    assert "%lora runs [MODEL|DIR]" in USAGE


# ----------------------------------------------------------------------------------------------- in a shell


def _shown(ip, obj) -> tuple[str, str]:
    html = ip.display_formatter.formatters["text/html"]
    enabled, html.enabled = html.enabled, True
    try:
        data, _ = ip.display_formatter.format(obj)
    finally:
        html.enabled = enabled
    return data["text/plain"], data.get("text/html", "")


@pytest.fixture
def trained(ip, tmp_path, monkeypatch):
    """A shell whose `model` trained once into ./lora_runs (here: a temporary directory), with checkpoints at 3
    and 6."""
    monkeypatch.chdir(tmp_path)
    _cell(ip, SETUP)
    run = jl.train(ip.user_ns["model"], ip.user_ns["texts"], tokenizer=ip.user_ns["tok"], steps=6, batch=4,
                   eval=0, save_every=3, lr=3e-3, background=False)  # fmt: skip
    return run


def test_runs_of_a_model_variable(ip, trained):
    listing = _cell(ip, "%lora runs model")
    assert isinstance(listing, jl.RunList)
    assert [r.step for r in listing.checkpoints] == [3, 6] and listing.variable == "model"
    text, html = _shown(ip, listing)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert re.fullmatch(r"-+( +-+)+", lines[header + 1])
    assert str(trained.output_dir / "checkpoint-6") in text
    assert "<table" in html and html.count("<tr data-run") == 2
    assert f"%lora resume model {trained.output_dir}/checkpoint-3" in html
    assert f"%lora load model {trained.output_dir}/checkpoint-6" in html


def test_runs_of_a_directory_and_of_nothing(ip, trained):
    by_dir = _cell(ip, f"%lora runs {trained.output_dir}")
    assert [r.step for r in by_dir.checkpoints] == [3, 6]
    assert by_dir.variable == "model"  # the notebook's one model names the code
    everything = _cell(ip, "%lora runs")
    assert {r.checkpoint for r in by_dir.checkpoints} <= {r.checkpoint for r in everything.checkpoints}
    ip.user_ns["where"] = str(trained.output_dir)  # a variable holding the directory
    assert [r.step for r in _cell(ip, "%lora runs where").checkpoints] == [3, 6]


def test_the_code_does_not_name_another_model(ip, trained):
    """With the trained model gone and another model the notebook's only one, the listing's code used to name that
    other model (a BERT offered a Llama's checkpoint); a model that trained nothing here gets the placeholder."""
    _cell(ip, "clf = jl.inject(tiny_model('bert'), r=4)\ndel model")
    listing = _cell(ip, f"%lora runs {trained.output_dir}")
    assert listing.variable == "MODEL"
    _, html = _shown(ip, listing)
    assert "%lora resume clf" not in html and f"%lora resume MODEL {trained.output_dir}/checkpoint-3" in html


def test_the_code_shown_runs_as_shown(ip, trained):
    listing = _cell(ip, "%lora runs model")
    row = listing.checkpoints[0]  # checkpoint-3
    _, html = _shown(ip, listing)
    codes = re.findall(r"<code style='user-select:all[^']*'>(.*?)</code>", html)
    resume = next(c for c in codes if c.startswith("%lora resume") and c.endswith("checkpoint-3"))
    load = next(c for c in codes if c.startswith("%lora load") and c.endswith("checkpoint-3"))
    ip.run_line_magic("config", "LoraMagics.progress = 'text'")
    _cell(ip, resume)
    resumed = jl.last_run(ip.user_ns["model"])
    resumed.wait(60)
    assert resumed.resume_from == row.checkpoint and resumed.state == "finished" and resumed.step == 6
    ip.user_ns["model"] = jl.unload(ip.user_ns["model"])
    _cell(ip, load)
    assert [a.name for a in jl.status(ip.user_ns["model"]).adapters] == ["default"]


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("%lora runs modle", r"no model variable and no directory called `modle`\. Did you mean `model`\?"),
        ("%lora runs texts", r"`texts` is of type list, neither a model nor a directory"),
        ("%lora runs no/such/dir", r"`path` 'no/such/dir' does not exist"),
    ],
    ids=["misspelled-model", "not-a-model", "missing-directory"],
)
def test_mistakes_are_one_line(ip, tmp_path, monkeypatch, capsys, line, pattern):
    monkeypatch.chdir(tmp_path)
    _cell(ip, SETUP)
    capsys.readouterr()
    result = ip.run_cell(line)
    assert isinstance(result.error_in_exec, IPythonUsageError)
    message = str(result.error_in_exec)
    assert re.search(pattern, message) and "\n" not in message
    assert "Traceback" not in capsys.readouterr().out
    assert not Path("lora_runs").exists()
