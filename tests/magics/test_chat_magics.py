"""``%lora chat``: the grammar alone (tables of lines), then in a real IPython shell — the widget it returns, the
tokenizer and settings it passes on, and mistakes as one line of ``UsageError`` that changes nothing."""

from __future__ import annotations

import re

import pytest
from chat_models import adapted_lm, chat_tokenizer
from model_state import assert_model_unchanged, model_snapshot
from shell_cells import run, usage_error

import jupyter_lora as jl
from jupyter_lora.core import runs
from jupyter_lora.core.errors import UsageError
from jupyter_lora.magics.parse import Chat, parse
from jupyter_lora.settings import SETTINGS, keys
from jupyter_lora.testing import tiny_config, tiny_model, tiny_tokenizer
from jupyter_lora.widgets.chat import ChatWidget, ClassifierWidget, TranscriptWidget

# ----------------------------------------------------------------------------------------------- grammar

VALID: list[tuple[str, str, str | None, Chat]] = [
    ("bare", "chat model", None, Chat("model")),
    ("tokenizer", "chat model --tokenizer tok", None, Chat("model", tokenizer="tok")),
    (
        "processor",
        "chat vit --processor proc max_new_tokens=8",
        None,
        Chat("vit", settings={"max_new_tokens": 8}, processor="proc"),
    ),
    (
        "settings-on-the-line",
        "chat model temperature=0.2 top_p=0.95 max_new_tokens=64 seed=3",
        None,
        Chat("model", settings={"temperature": 0.2, "top_p": 0.95, "max_new_tokens": 64, "seed": 3}),
    ),
    (
        "short-scientific-notation",
        "chat model temperature=2e-1",
        None,
        Chat("model", settings={"temperature": 0.2}),
    ),
    # YAML would read on/off as true/false: on the line they stay the choice typed
    ("adapter-off", "chat model adapter=off", None, Chat("model", settings={"adapter": "off"})),
    ("adapter-on", "chat model adapter=on", None, Chat("model", settings={"adapter": "on"})),
    (
        "adapter-side-by-side",
        "chat model adapter=side-by-side",
        None,
        Chat("model", settings={"adapter": "side-by-side"}),
    ),
    (
        "quoted-system-message",
        'chat model --tokenizer tok system="You are kind: answer briefly."',
        None,
        Chat("model", "tok", {"system": "You are kind: answer briefly."}),
    ),
    (
        "yaml-body",
        "chat model",
        "system: Be brief.\nadapter: side_by_side\nmax_new_tokens: 100\n",
        Chat("model", settings={"system": "Be brief.", "adapter": "side_by_side", "max_new_tokens": 100}),
    ),
    (
        "line-wins-over-body",
        "chat model max_new_tokens=8",
        "max_new_tokens: 100\ntemperature: 0",
        Chat("model", settings={"max_new_tokens": 8, "temperature": 0}),
    ),
    ("options-after-settings", "chat model seed=1 --tokenizer tok", None, Chat("model", "tok", {"seed": 1})),
    ("comment", "chat model  # talk to it", None, Chat("model")),
]


@pytest.mark.parametrize(("line", "cell", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_spelling_gives_exact_command(line, cell, expected):
    assert parse(line, cell) == expected


INVALID: list[tuple[str, str, str | None, str]] = [
    ("no-model", "chat", None, r"%lora chat: .*required: model"),
    (
        "not-a-pair",
        "chat model temperature",
        None,
        r"'temperature' is not a setting=value pair.*temperature=0.7",
    ),
    ("empty-key", "chat model =3", None, r"'=3' is not a setting=value pair"),
    (
        "misspelled-key",
        "chat model temprature=0.3",
        None,
        r"unknown setting `temprature`.*Did you mean `temperature`",
    ),
    ("training-key", "chat model lr=1e-4", None, r"`lr` is a setting of `%%lora train`, not of %lora chat"),
    (
        "training-key-in-body",
        "chat model",
        "lr: 1e-4",
        r"`lr` is a setting of `%%lora train`, not of this cell",
    ),
    ("bad-model-name", "chat 1model", None, r"`MODEL` must be a variable name, got '1model'"),
    ("bad-tokenizer-name", "chat model --tokenizer 1tok", None, r"`--tokenizer` must be a variable name"),
    ("unknown-option", "chat model --temperature 3", None, r"unrecognized arguments: --temperature"),
]


@pytest.mark.parametrize(("line", "cell", "pattern"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_input_raises_one_line(line, cell, pattern):
    with pytest.raises(UsageError, match=pattern) as info:
        parse(line, cell)
    assert "\n" not in str(info.value)


def test_every_chat_setting_can_be_given_on_the_line():
    for name in keys("chat"):
        example = SETTINGS[name].example
        command = parse(f'chat model {name}="{example}"')
        assert name in command.settings, name
        assert (
            jl.Conversation(adapted_lm()[0], chat_tokenizer(), **command.settings).settings[name] is not None
        )


# ----------------------------------------------------------------------------------------------- in a shell


@pytest.fixture
def adapted(ip):
    ip.user_ns["model"], _ = adapted_lm()
    ip.user_ns["tok"] = chat_tokenizer()
    return ip


def test_chat_returns_the_widget_bound_to_the_variable(adapted):
    ip = adapted
    widget = run(ip, "%lora chat model temperature=0 max_new_tokens=6 adapter=side-by-side")
    assert isinstance(widget, ChatWidget)
    assert widget.variable == "model" and widget.namespace is ip.user_ns
    assert widget.conversation.tokenizer is ip.user_ns["tok"]  # the only tokenizer in the notebook
    assert {k: widget.conversation.settings[k] for k in ("temperature", "max_new_tokens", "adapter")} == {
        "temperature": 0,
        "max_new_tokens": 6,
        "adapter": "side_by_side",
    }
    turn = widget.conversation.send("Hi")
    expected = jl.Conversation(ip.user_ns["model"], ip.user_ns["tok"], temperature=0, max_new_tokens=6,
                               adapter="side_by_side").send("Hi")  # fmt: skip
    assert turn == expected


def test_config_defaults_reach_the_chat(adapted):
    ip = adapted
    ip.user_ns["tok2"] = tiny_tokenizer()
    run(ip, "%config LoraMagics.default_temperature = 0\n%config LoraMagics.chat_adapter = 'off'")
    widget = run(ip, "%lora chat model --tokenizer tok2 top_p=0.5")
    assert widget.conversation.tokenizer is ip.user_ns["tok2"]
    assert widget.conversation.settings["temperature"] == 0
    assert widget.conversation.settings["adapter"] == "off"
    assert widget.conversation.settings["top_p"] == 0.5
    assert widget.adapter.value == "off"


def test_a_classifier_gets_the_probabilities_view(ip):
    ip.user_ns["clf"] = jl.inject(tiny_model("bert", vocab_size=98), r=2, targets="attention")
    ip.user_ns["tok"] = tiny_tokenizer()
    assert isinstance(run(ip, "%lora chat clf"), ClassifierWidget)


def test_image_and_audio_models_get_the_upload_views_with_the_notebooks_processor(ip, capsys):
    from media_models import vit, vit_processor, whisper, whisper_processor

    ip.user_ns["model"] = jl.inject(vit(), r=2, targets="all-linear")
    ip.user_ns["tok"] = tiny_tokenizer()  # a text tokenizer in the notebook plays no part
    ip.user_ns["proc"] = vit_processor()
    widget = run(ip, "%lora chat model")  # the only processor in the notebook
    assert isinstance(widget, ClassifierWidget) and widget.conversation.processor is ip.user_ns["proc"]
    assert widget.upload.accept == "image/*" and widget.variable == "model"

    ip.user_ns["speech"] = jl.inject(whisper(), r=2, targets="all-linear")
    ip.user_ns["wproc"] = whisper_processor()
    assert "several processors (proc, wproc)" in usage_error(ip, capsys, "%lora chat speech")
    widget = run(ip, "%lora chat speech --processor wproc max_new_tokens=3")
    assert isinstance(widget, TranscriptWidget) and widget.conversation.processor is ip.user_ns["wproc"]
    assert widget.upload.accept == "audio/*" and widget.conversation.settings["max_new_tokens"] == 3


MISTAKES = [
    ("bad-temperature", "%lora chat model temperature=5", r"`temperature` must be in \[0, 2\], got 5\."),
    (
        "bad-max-new-tokens",
        "%lora chat model max_new_tokens=abc",
        r"`max_new_tokens` must be a whole number.*'abc'",
    ),
    (
        "bad-adapter",
        "%lora chat model adapter=both",
        r"`adapter` must be one of on, off, side_by_side, got 'both'",
    ),
    ("misspelled-setting", "%lora chat model tmperature=1", r"Did you mean `temperature`"),
    ("not-a-model", "%lora chat x", r"`x` is of type int, not a model"),
    ("no-such-variable", "%lora chat modle", r"no variable `modle`.*Did you mean `model`"),
    ("no-such-tokenizer", "%lora chat model --tokenizer tokk", r"no variable `tokk`"),
    (
        "image-model-without-processor",
        "%lora chat vit",
        r"reads images and needs its processor.*AutoImageProcessor",
    ),
    ("no-such-processor", "%lora chat vit --processor procc", r"no variable `procc`"),
    ("not-a-chat-model", "%lora chat encoder", r"`chat` generates with causal or seq2seq LMs.*BertModel"),
]


@pytest.mark.parametrize(("source", "pattern"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_and_changes_nothing(adapted, capsys, source, pattern):
    ip = adapted
    ip.user_ns["x"] = 3
    ip.user_ns["vit"] = tiny_model("vit")
    ip.user_ns["encoder"] = __import__("transformers").BertModel(tiny_config("bert"))
    before = model_snapshot(ip.user_ns["model"])
    names = {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_")}
    message = usage_error(ip, capsys, source)
    assert re.search(pattern, message), message
    assert_model_unchanged(before, ip.user_ns["model"])
    assert {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_")} == names


def test_without_any_tokenizer_the_message_says_how_to_give_one(ip, capsys):
    ip.user_ns["model"], _ = adapted_lm()
    message = usage_error(ip, capsys, "%lora chat model")
    assert "`tokenizer` is needed" in message and "%lora chat model --tokenizer tok" in message


def test_a_model_in_training_is_refused(adapted, capsys):
    ip = adapted

    class Running:  # what the engine registers for a run in progress
        done, step, total_steps = False, 2, 50

    assert runs.register(ip.user_ns["model"], Running())
    try:
        message = usage_error(ip, capsys, "%lora chat model")
    finally:
        runs.finish(ip.user_ns["model"])
    assert re.fullmatch(
        r"Cannot generate while this model is training \(step 2/50\)\. Stop the run first: .*", message
    )
    assert isinstance(run(ip, "%lora chat model"), ChatWidget)


def test_help_describes_chat(ip):
    text = run(ip, "%lora help").data
    assert "%lora chat MODEL [--tokenizer VAR] [--processor VAR] [setting=value ...]" in text
    assert "upload a file or type its path" in text and "transcripts for speech" in text
    for name in keys("chat"):
        assert f"{name}: {SETTINGS[name].example}" in text
