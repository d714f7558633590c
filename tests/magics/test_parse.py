"""The ``%lora`` / ``%%lora`` grammar alone: (line, cell) -> one frozen command object, or a ``UsageError`` whose
message says what is wrong. No IPython, no torch, no model.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from jupyter_lora.core.errors import UsageError
from jupyter_lora.magics.parse import (
    SUBCOMMANDS,
    Command,
    Compare,
    Estimate,
    Help,
    Inject,
    Load,
    ModelCommand,
    NamedCommand,
    Save,
    Status,
    parse,
)

# ----------------------------------------------------------------------------------------------- valid spellings

VALID: list[tuple[str, str, str | None, Command]] = [
    # --- %%lora MODEL: inject
    ("inject-bare-line", "model", None, Inject(model="model")),
    ("inject-empty-body", "model", "", Inject(model="model")),
    ("inject-blank-body", "model", "  \n\n", Inject(model="model")),
    ("inject-comment-only-body", "model", "# nothing yet\n", Inject(model="model")),
    (
        "inject-name-dry-run",
        "model --name chat --dry-run",
        "r: 8\ntargets: q_proj",
        Inject(
            model="model", name="chat", dry_run=True, replace=False, settings={"r": 8, "targets": "q_proj"}
        ),
    ),
    (
        "inject-replace",
        "model --replace",
        "r: 4",
        Inject(model="model", replace=True, settings={"r": 4}),
    ),
    (
        "inject-options-any-order",
        "model --replace --dry-run --name v2",
        None,
        Inject(model="model", name="v2", dry_run=True, replace=True),
    ),
    (
        "inject-full-body",
        "model",
        "r: 16\nalpha: 32\ndropout: 0.05\ntargets: q_proj, v_proj\nlayers: 0-11\nexclude: lm_head\n"
        "variant: dora\ninit: gaussian\nmodules_to_save: classifier\nbias: none\ntask_type: causal_lm\n",
        Inject(
            model="model",
            settings={
                "r": 16,
                "alpha": 32,
                "dropout": 0.05,
                "targets": "q_proj, v_proj",
                "layers": "0-11",
                "exclude": "lm_head",
                "variant": "dora",
                "init": "gaussian",
                "modules_to_save": "classifier",
                "bias": "none",
                "task_type": "causal_lm",
            },
        ),
    ),
    (
        "inject-yaml-list-targets",
        "model",
        "targets: [q_proj, v_proj]\nlayers: [0, 1]",
        Inject(model="model", settings={"targets": ["q_proj", "v_proj"], "layers": [0, 1]}),
    ),
    (
        "inject-peft-aliases",  # PEFT's spellings arrive under the settings' own names
        "model",
        "lora_r: 8\nlora_alpha: 16\nlora_dropout: 0.1\ntarget_modules: q_proj",
        Inject(
            model="model",
            settings={"r": 8, "alpha": 16, "dropout": 0.1, "targets": "q_proj"},
        ),
    ),
    (
        "inject-trailing-comment",
        "model --dry-run   # just looking",
        "r: 4  # small\n",
        Inject(model="model", dry_run=True, settings={"r": 4}),
    ),
    (
        "inject-comment-without-options",
        "model # first try",
        "r: 8",
        Inject(model="model", settings={"r": 8}),
    ),
    # a cell whose variable name looks like a misspelled subcommand is still an inject when it has a body
    ("inject-variable-near-subcommand", "stauts", "r: 8", Inject(model="stauts", settings={"r": 8})),
    # --- status
    ("status-all", "status", None, Status()),
    ("status-model", "status model", None, Status("model")),
    ("status-comment", "status model  # which adapters?", None, Status("model")),
    # --- estimate
    ("estimate-plain", "estimate model", None, Estimate(source="model")),
    (
        "estimate-all-options-4bit",
        "estimate model --seq 512 --batch 4 --ckpt --optim adamw8bit --dtype bf16 --4bit",
        None,
        Estimate(
            source="model",
            options={
                "seq": 512,
                "batch": 4,
                "ckpt": True,
                "optim": "adamw8bit",
                "dtype": "bf16",
                "quant": "4bit",
            },
        ),
    ),
    (
        "estimate-8bit-fp16-paged",
        "estimate cfg --8bit --dtype fp16 --optim paged_adamw8bit",
        None,
        Estimate(source="cfg", options={"quant": "8bit", "dtype": "fp16", "optim": "paged_adamw8bit"}),
    ),
    (
        "estimate-path",
        "estimate ./models/llama-7b --seq 2048",
        None,
        Estimate(source="./models/llama-7b", options={"seq": 2048}),
    ),
    (
        "estimate-hub-id",
        "estimate meta-llama/Llama-2-7b-hf",
        None,
        Estimate(source="meta-llama/Llama-2-7b-hf"),
    ),
    (
        "estimate-yaml-body",
        "estimate model",
        "seq: 256\nbatch: 2\nckpt: true\nr: 8\ntargets: attention",
        Estimate(
            source="model",
            options={"seq": 256, "batch": 2, "ckpt": True},
            settings={"r": 8, "targets": "attention"},
        ),
    ),
    (
        "estimate-line-overrides-body",
        "estimate model --seq 64",
        "seq: 256\nalpha: 16",
        Estimate(source="model", options={"seq": 64}, settings={"alpha": 16}),
    ),
    # --- merge / unload / enable / disable
    ("merge", "merge model", None, ModelCommand("merge", "model")),
    ("unload", "unload model", None, ModelCommand("unload", "model")),
    ("enable", "enable model", None, ModelCommand("enable", "model")),
    ("disable", "disable model", None, ModelCommand("disable", "model")),
    # --- use / delete
    ("use", "use model chat", None, NamedCommand("use", "model", "chat")),
    ("delete", "delete model chat", None, NamedCommand("delete", "model", "chat")),
    # --- save / load
    ("save", "save model adapters/run1", None, Save("model", "adapters/run1")),
    (
        "save-merged-name",
        "save model out/merged --merged --name chat",
        None,
        Save("model", "out/merged", merged=True, name="chat"),
    ),
    ("save-quoted-path", 'save model "my adapters/run 1"', None, Save("model", "my adapters/run 1")),
    ("load", "load model adapters/run1", None, Load("model", "adapters/run1")),
    ("load-name", "load model adapters/run1 --name chat", None, Load("model", "adapters/run1", name="chat")),
    # --- compare
    (
        "compare-quoted-prompt",
        'compare model "Once upon a time"',
        None,
        Compare("model", "Once upon a time"),
    ),
    ("compare-single-quotes", "compare model 'Hi there'", None, Compare("model", "Hi there")),
    (
        "compare-tokenizer-max-new-tokens",
        'compare model "Hello" --tokenizer tok --max-new-tokens 12',
        None,
        Compare("model", "Hello", tokenizer="tok", max_new_tokens=12),
    ),
    (
        "compare-prompt-in-body",
        "compare model --tokenizer tok",
        "  Once upon a time\nthere was  \n",
        Compare("model", "Once upon a time\nthere was", tokenizer="tok"),
    ),
    (
        "compare-hash-inside-quotes",
        'compare model "issue #12 is" # a comment',
        None,
        Compare("model", "issue #12 is"),
    ),
    # --- help
    ("help", "help", None, Help()),
    ("help-question-mark", "?", None, Help()),
    ("help-long-option", "--help", None, Help()),
    ("help-short-option", "-h", None, Help()),
    ("help-with-words", "help estimate", None, Help()),
]


@pytest.mark.parametrize(("line", "cell", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_spelling_gives_exact_command(line, cell, expected):
    command = parse(line, cell)
    assert type(command) is type(expected)
    assert command == expected


def test_every_subcommand_is_understood():
    for sub in SUBCOMMANDS:
        line = {
            "use": "use m a",
            "delete": "delete m a",
            "save": "save m p",
            "load": "load m p",
            "compare": "compare m hi",
            "generate": "generate m hi",
            "base": "base m some/model",
            "export": "export m job",
            "data": "data m texts",
        }.get(sub, f"{sub} m")
        cell = "data: texts" if sub in ("train", "export", "sweep") else None
        assert not isinstance(parse(line, cell), Inject), sub


def test_commands_are_frozen():
    command = parse("model --name chat", "r: 8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.name = "other"  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- invalid input

INVALID: list[tuple[str, str, str | None, str]] = [
    ("empty-line", "", None, r"say what to do.*%lora help"),
    ("blank-line", "   ", None, r"say what to do"),
    ("comment-only-line", "# nothing", None, r"say what to do"),
    ("unknown-subcommand", "stauts model", None, r"unknown subcommand 'stauts'.*Did you mean `status`\?"),
    ("unknown-subcommand-alone", "stauts", None, r"unknown subcommand 'stauts'.*Did you mean `status`\?"),
    ("misspelled-estimate", "estimte model", None, r"unknown subcommand 'estimte'.*Did you mean `estimate`"),
    ("option-before-model", "--dry-run model", "r: 8", r"model variable comes first.*'--dry-run'"),
    ("option-only", "--name chat", None, r"model variable comes first"),
    ("unknown-inject-option", "model --bogus", "r: 8", r"unrecognized arguments: --bogus"),
    ("name-without-value", "model --name", None, r"--name: expected one argument"),
    ("yaml-bad-indent", "model", "r: 8\n  alpha: 3\n", r"not valid YAML on line 2\b"),
    ("yaml-missing-colon", "model", "r: 8\nalpha: 16\ntargets: x: y\n", r"not valid YAML on line 3\b"),
    ("yaml-is-list", "model", "- r\n- 8\n", r"must be `key: value` lines.*list"),
    ("yaml-is-scalar", "model", "hello", r"must be `key: value` lines.*str.*'hello'"),
    ("yaml-is-number", "model", "42", r"must be `key: value` lines.*int"),
    ("unknown-yaml-key", "model", "r: 8\nalhpa: 16", r"unknown setting `alhpa`.*Did you mean `alpha`\?"),
    ("unknown-yaml-key-lists-settings", "model", "rnak: 8", r"unknown setting `rnak`.*Settings: r, alpha"),
    ("estimate-unknown-yaml-key", "estimate model", "sqe: 128", r"unknown setting `sqe`.*`seq`"),
    ("non-identifier-model", "1model", "r: 8", r"`MODEL` must be a variable name, got '1model'"),
    ("non-identifier-status-model", "status 1model", None, r"`MODEL` must be a variable name.*'1model'"),
    ("non-identifier-merge-model", "merge my-model", None, r"must be a variable name.*'my-model'"),
    ("unclosed-quote", 'compare model "Once upon', None, r"close the quotes"),
    ("seq-zero", "estimate model --seq 0", None, r"--seq: must be a positive whole number, got '0'"),
    (
        "seq-not-a-number",
        "estimate model --seq abc",
        None,
        r"--seq: must be a positive whole number, got 'abc'",
    ),
    ("batch-negative", "estimate model --batch -1", None, r"--batch: must be a positive whole number"),
    ("optim-unknown", "estimate model --optim adamx", None, r"--optim: invalid choice: 'adamx'"),
    ("dtype-unknown", "estimate model --dtype int4", None, r"--dtype: invalid choice: 'int4'"),
    ("both-4bit-and-8bit", "estimate model --4bit --8bit", None, r"--8bit: not allowed with argument --4bit"),
    ("estimate-without-source", "estimate", None, r"required: source"),
    ("status-two-models", "status a b", None, r"unrecognized arguments: b"),
    ("merge-without-model", "merge", None, r"%lora merge: .*required: model"),
    ("use-without-name", "use model", None, r"%lora use: .*required: name"),
    ("delete-without-name", "delete model", None, r"%lora delete: .*required: name"),
    ("save-without-path", "save model", None, r"%lora save: .*required: path"),
    ("load-without-path", "load model", None, r"%lora load: .*required: path"),
    ("compare-without-prompt", "compare model", None, r"give a prompt"),
    ("compare-blank-body", "compare model", " \n \n", r"give a prompt"),
    (
        "compare-bad-tokenizer-name",
        "compare model hi --tokenizer 1tok",
        None,
        r"`--tokenizer` must be a variable",
    ),
    (
        "compare-max-new-tokens-zero",
        "compare model hi --max-new-tokens 0",
        None,
        r"--max-new-tokens: must be",
    ),
]


@pytest.mark.parametrize(("line", "cell", "pattern"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_input_raises_usage_error(line, cell, pattern):
    with pytest.raises(UsageError, match=pattern):
        parse(line, cell)


def test_usage_error_is_the_core_class_not_ipythons():
    # the grammar knows nothing about IPython; the magic translates the error
    with pytest.raises(UsageError) as info:
        parse("stauts model")
    assert type(info.value).__module__ == "jupyter_lora.core.errors"


# ----------------------------------------------------------------------------------------------- purity


def test_parse_imports_neither_torch_nor_ipython():
    code = (
        "import sys\n"
        "from jupyter_lora.magics.parse import parse\n"
        "parse('status m'); parse('m', 'r: 8\\ntargets: q_proj'); parse('estimate m --seq 8', 'r: 4')\n"
        "print('torch' in sys.modules, 'IPython' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


def test_parse_does_not_mutate_or_share_state():
    body = "r: 8\ntargets: q_proj"
    first = parse("model", body)
    first.settings["r"] = 99  # type: ignore[index]
    assert parse("model", body).settings == {"r": 8, "targets": "q_proj"}
    assert parse("model").settings == {}
    assert parse("model").settings is not parse("model").settings


def test_duplicate_yaml_key_is_an_error_not_a_silent_overwrite():
    with pytest.raises(UsageError, match=r"line 2: `r` is given twice"):
        parse("model", "r: 8\nr: 4\n")


def test_argument_errors_are_one_line():
    with pytest.raises(UsageError) as info:
        parse("estimate model --seq 0 --batch 2 --optim adamw --dtype bf16")
    assert "\n" not in str(info.value)
    assert "Usage: %lora estimate" in str(info.value)


def test_short_scientific_notation_is_a_number():
    command = parse("train model", "data: texts\nlr: 2e-4\nwarmup: 1E2\n")
    assert command.settings == {"data": "texts", "lr": 2e-4, "warmup": 100.0}


# ----------------------------------------------------------------------------------------------- model variables

# A first word that is close to a subcommand is a misspelled subcommand, unless a notebook variable of that name
# holds a model: then it is that model (the magic passes the names of the variables that hold models).
MODEL_NAMED_LIKE_A_SUBCOMMAND = [
    ("merged-dry-run", "merged --dry-run", "", Inject(model="merged", dry_run=True)),
    ("plain-dry-run-body", "plain --dry-run", "r: 8", Inject(model="plain", dry_run=True, settings={"r": 8})),
    ("loader-name", "loader --name chat", "r: 4", Inject(model="loader", name="chat", settings={"r": 4})),
    ("stats-line-magic", "stats", None, Inject(model="stats")),
    ("saved-replace", "saved --replace", "", Inject(model="saved", replace=True)),
]


@pytest.mark.parametrize(
    ("line", "cell", "expected"),
    [v[1:] for v in MODEL_NAMED_LIKE_A_SUBCOMMAND],
    ids=[v[0] for v in MODEL_NAMED_LIKE_A_SUBCOMMAND],
)
def test_a_model_variable_wins_over_a_close_subcommand(line, cell, expected):
    assert parse(line, cell, models={expected.model, "model"}) == expected


def test_a_close_word_that_is_no_model_stays_a_misspelled_subcommand():
    with pytest.raises(
        UsageError, match=r"unknown subcommand 'merged'.*`merge`.*No model variable is called `merged`"
    ):
        parse("merged --dry-run", "", models={"model"})
    with pytest.raises(UsageError, match=r"unknown subcommand 'stauts'.*`status`"):
        parse("stauts model", None, models={"model", "merged"})


def test_a_model_named_exactly_like_a_subcommand_is_told_how_to_inject_into_it():
    # `%%lora base --dry-run` is the `base` subcommand; the message says how to reach the model called base
    with pytest.raises(UsageError) as info:
        parse("base --dry-run", "r: 8", models={"base"})
    message = str(info.value)
    assert message.startswith("%lora base: ")
    assert "`base` is also a model variable" in message and "`base_model = base`" in message
    assert "%%lora base_model" in message and "\n" not in message
    with pytest.raises(UsageError) as info:
        parse("base --dry-run", "r: 8", models={"model"})
    assert "model variable" not in str(info.value)


# ----------------------------------------------------------------------------------------------- cells written back

WRITTEN = [
    ("numbers", {"data": "texts", "lr": 2e-05, "steps": 200, "warmup": 0.0, "eval": 0.1, "epochs": 1.5}),
    (
        "flags-and-choices",
        {"data": "texts", "ckpt": True, "packing": False, "keep_best": None, "optim": "sgd"},
    ),
    ("texts-yaml-would-misread", {"data": "d/x.jsonl", "output_dir": "runs/a #1", "run_name": "123"}),
    (
        "text-with-colon-and-newline",
        {"data": "texts", "samples": ["Once upon: a time", "line\nbreak", "true"]},
    ),
    ("mapping", {"data": "texts", "trainer_args": {"logging_first_step": True, "adam_beta2": 0.99}}),
]


@pytest.mark.parametrize(("case", "settings"), WRITTEN, ids=[c for c, _ in WRITTEN])
def test_a_written_train_cell_parses_back_to_its_settings(case, settings):
    from jupyter_lora.magics.parse import Train, read_value, train_cell, write_value

    text = train_cell("model", settings)
    line, _, body = text.partition("\n")
    assert line == "%%lora train model" and len(body.splitlines()) == len(settings)  # one line per setting
    assert parse(line.removeprefix("%%lora "), body) == Train(model="model", settings=settings)
    for value in settings.values():
        assert read_value(write_value(value)) == value


def test_a_written_inject_cell_parses_back_with_its_name():
    from jupyter_lora.magics.parse import inject_cell

    settings = {"r": 8, "alpha": 12.5, "targets": "q_proj, v_proj", "layers": [0, 2]}
    text = inject_cell("model", settings, name="my adapter")
    line, _, body = text.partition("\n")
    assert parse(line.removeprefix("%%lora "), body) == Inject(
        model="model", name="my adapter", settings=settings
    )


def test_a_value_that_is_not_yaml_is_a_usage_error_with_an_example():
    from jupyter_lora.magics.parse import read_value

    with pytest.raises(UsageError, match=r"`samples`: '\[a' cannot be read as a value .* E.g. samples: \["):
        read_value("[a", "samples")
    assert (
        read_value("2e-4") == 2e-4
        and read_value("") is None
        and read_value("q_proj, v_proj") == "q_proj, v_proj"
    )
