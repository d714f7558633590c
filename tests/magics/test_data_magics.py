"""``%lora data`` / ``%%lora data``: the grammar alone (line + body -> one frozen ``Data`` command, or a one-line
UsageError), then in a real shell: variables and paths resolved as ``%%lora train`` resolves them, the result is
the Python API's preview, mistakes are one line with a did-you-mean."""

from __future__ import annotations

import dataclasses
import json

import pytest
from shell_cells import run, usage_error

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.magics.parse import USAGE, Data, parse

# ----------------------------------------------------------------------------------------------- grammar

VALID = [
    ("line", "data model texts", None, Data("model", {"data": "texts"})),
    ("n", "data model texts --n 5", None, Data("model", {"data": "texts"}, n=5)),
    ("n-zero", "data model texts --n 0", None, Data("model", {"data": "texts"}, n=0)),
    (
        "line-settings-are-yaml-values",
        "data model texts seq=256 packing=true eval=0.1 text_column=body",
        None,
        Data("model", {"data": "texts", "seq": 256, "packing": True, "eval": 0.1, "text_column": "body"}),
    ),
    ("alias", "data model texts max_seq_len=64", None, Data("model", {"data": "texts", "seq": 64})),
    ("path", "data model 'my data/train.jsonl'", None, Data("model", {"data": "my data/train.jsonl"})),
    # a text setting is taken as written: Jinja is not YAML, a number-like run name stays text
    (
        "jinja-on-line",
        "data model chat chat_template=\"{% for m in messages %}{{ m['content'] }}{% endfor %}\" "
        "run_name=123",
        None,
        Data(
            "model",
            {
                "data": "chat",
                "run_name": "123",
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            },
        ),
    ),
    (
        "cell-body",
        "data model texts",
        "seq: 128\nchat_template: plain\n",
        Data("model", {"data": "texts", "seq": 128, "chat_template": "plain"}),
    ),
    (
        "a-train-body-as-it-is",
        "data model",
        "data: texts\ntokenizer: tok\nsteps: 100\nlr: 2e-4\nprogress: text\n",
        Data("model", {"data": "texts", "tokenizer": "tok", "steps": 100, "lr": 2e-4, "progress": "text"}),
    ),
    (
        "the-line-wins-over-the-body",
        "data model texts seq=32",
        "seq: 128\n",
        Data("model", {"data": "texts", "seq": 32}),
    ),
    ("same-data-twice", "data model texts", "data: texts", Data("model", {"data": "texts"})),
]


@pytest.mark.parametrize(("line", "cell", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_spellings(line, cell, expected):
    command = parse(line, cell)
    assert command == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.n = 1


INVALID = [
    ("no-data", "data model", None, r"say which data to preview"),
    ("no-model", "data", None, r"%lora data: the following arguments are required: model"),
    ("model-not-a-name", "data 3model texts", None, r"`MODEL` must be a variable name"),
    ("unknown-line-setting", "data model texts sqe=5", None, r"unknown setting `sqe`\. Did you mean `seq`\?"),
    ("inject-setting-on-line", "data model texts r=8", None, r"`r` is a setting of a `%%lora MODEL` cell"),
    (
        "unknown-body-setting",
        "data model texts",
        "pakcing: true",
        r"unknown setting `pakcing`\. Did you mean",
    ),
    ("data-twice", "data model texts", "data: other", r"the data is given twice"),
    ("setting-twice-on-line", "data model texts seq=1 seq=2", None, r"`seq` is given twice"),
    ("negative-n", "data model texts --n -1", None, r"--n: must be a whole number >= 0"),
    ("extra-word", "data model texts more", None, r"unrecognized arguments: more"),
    ("bad-yaml-value", "data model texts seq=[1", None, r"the value of `seq=\[1` cannot be read"),
]


@pytest.mark.parametrize(("line", "cell", "pattern"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_input(line, cell, pattern):
    with pytest.raises(UsageError, match=pattern) as info:
        parse(line, cell)
    assert "\n" not in str(info.value)


def test_help_describes_the_subcommand():
    assert "%lora data MODEL DATA [--n N] [setting=value ...]" in USAGE


# ----------------------------------------------------------------------------------------------- in a shell

SETUP = (
    "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = tiny_model('llama')\n"
    "tok = tiny_tokenizer()\n"
    "records = [{'prompt': f'Q{i}: ', 'response': 'an answer ' * (i + 1)} for i in range(30)]\n"
)


def test_the_magic_returns_the_api_preview(ip, monkeypatch):
    run(ip, SETUP)
    shown = run(ip, "%lora data model records --n 2 seq=40 eval=0.2")
    assert isinstance(shown, jl.DataPreview)
    ns = ip.user_ns
    same = jl.preview_data(ns["model"], ns["records"], ns["tok"], n=2, seq=40, eval=0.2)
    assert shown == same and len(shown.records) == 2
    assert (shown.train, shown.eval, shown.truncated) == (24, 6, same.truncated) and same.truncated > 0
    # what a notebook shows: the HTML and the text of that preview
    monkeypatch.setattr(ip.display_formatter.formatters["text/html"], "enabled", True)  # as in a kernel
    data, _ = ip.display_formatter.format(shown)
    assert data["text/plain"].startswith("Data preview — causal LM, seq 40, batch 8")
    assert "class='jl-masked'" in data["text/html"]


def test_a_train_cell_body_previews_what_it_would_train_on(ip):
    run(ip, SETUP)
    ip.run_line_magic("config", "LoraMagics.default_seq = 24")  # a %config default counts, as in training
    shown = run(
        ip, "%%lora data model\ndata: records\ntokenizer: tok\nsteps: 5\nprogress: text\npacking: true\n"
    )
    assert shown.seq == 24 and shown.packing and shown.packing_efficiency == 1.0


def test_data_from_a_file_path(ip, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(4)) + "\n")
    run(ip, SETUP)
    shown = run(ip, f"%lora data model '{path}'")
    assert shown.n_records == 4 and shown.train == 4


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("%lora data modle records", "no variable `modle` in the notebook (MODEL). Did you mean `model`?"),
        ("%lora data model recrods", "%lora data: no variable `recrods` for `data`. Did you mean `records`?"),
        ("%lora data tok records", "`tok` is of type"),
        ("%lora data model records seq=0", "`seq` must be a positive whole number"),
        ("%lora data model records sqe=3", "unknown setting `sqe`. Did you mean `seq`?"),
        ("%lora data model records text_column=promt", "`text_column`='promt' is not a column of `data`"),
        ("%lora data model missing.jsonl", "`data` file not found: 'missing.jsonl'"),
        ("%lora data model records chat_template=nope", None),  # no messages: the template is not used
    ],
)
def test_mistakes_are_one_line(ip, capsys, source, expected):
    run(ip, SETUP)
    if expected is None:
        assert run(ip, source).train == 30
        return
    assert expected in usage_error(ip, capsys, source)


def test_several_tokenizers_must_be_named(ip, capsys):
    run(ip, SETUP + "tok2 = tiny_tokenizer()\n")
    assert "several tokenizers (tok, tok2)" in usage_error(ip, capsys, "%lora data model records")
    assert run(ip, "%lora data model records tokenizer=tok2").train == 30
