"""The chat widgets' Python side without a kernel or browser: type into the box, click the buttons as the front end
would, move the sliders, and check the conversation, the HTML shown and the one-line messages."""

from __future__ import annotations

import html
import re
import time

import pytest
from chat_models import adapted_lm, chat_tokenizer, randomize_lora_b, talk_slowly

import jupyter_lora as jl
from jupyter_lora.core import runs
from jupyter_lora.settings import SETTINGS
from jupyter_lora.testing import tiny_model, tiny_tokenizer
from jupyter_lora.widgets.chat import ChatWidget, ClassifierWidget


@pytest.fixture
def ns():
    model, _ = adapted_lm()
    return {"model": model}


def _chat(ns, **settings):
    return jl.chat(ns["model"], chat_tokenizer(), variable="model", namespace=ns, **settings)


def _send(widget, text: str):
    widget.message.value = text
    widget.send_button.click()
    assert widget.reply is not None, widget.status.value
    widget.reply.wait(60)
    assert widget.reply.done
    return widget.reply


def _columns(widget) -> dict[str, str]:
    """side -> the text of that side's column in the transcript (tags turned into ``|``)."""
    columns = {}
    for part in widget.transcript.value.split("<div class='jl-chat-col jl-chat-")[1:]:
        side, _, body = part.partition("'>")
        columns[side] = html.unescape(re.sub(r"<[^>]+>", "|", body))
    return columns


def test_controls_come_from_the_schema(ns):
    widget = _chat(ns, temperature=0.3, max_new_tokens=2000)
    assert isinstance(widget, ChatWidget)
    for name in ("temperature", "top_p", "max_new_tokens"):
        s, control = SETTINGS[name], widget.controls[name]
        lo, hi, step = s.panel_range
        assert (control.min, control.step) == (lo, step), name
        assert control.max == max(hi, widget.conversation.settings[name]), name
        assert control.value == widget.conversation.settings[name]
    assert widget.controls["max_new_tokens"].max == 2000  # widened to a valid value beyond the usual range
    assert [v for _, v in widget.adapter.options] == list(SETTINGS["adapter"].choices)
    widget.controls["temperature"].value = 0
    widget.controls["top_p"].value = 0.5
    widget.adapter.value = "side_by_side"
    assert {k: widget.conversation.settings[k] for k in ("temperature", "top_p", "adapter")} == {
        "temperature": 0,
        "top_p": 0.5,
        "adapter": "side_by_side",
    }


def test_send_streams_the_reply_into_the_transcript(ns):
    widget = _chat(ns, temperature=0, max_new_tokens=12)
    reply = _send(widget, "Hi <there> & you")
    turn = widget.conversation.turns[-1]
    assert turn.user == "Hi <there> & you" and turn.replies == reply.turn.replies
    assert "Hi &lt;there&gt; &amp; you" in widget.transcript.value  # user text is escaped
    column = _columns(widget)["adapter"]
    assert "adapter 'default'" in column and turn.replies["adapter"] in column
    assert widget.message.value == ""
    assert not widget.send_button.disabled and widget.stop_button.disabled
    assert widget.status.value == ""


def test_side_by_side_shows_a_column_per_side(ns):
    widget = _chat(ns, temperature=0, max_new_tokens=10)
    widget.adapter.value = "side_by_side"
    _send(widget, "Hello")
    turn = widget.conversation.turns[-1]
    columns = _columns(widget)
    assert set(columns) == {"adapter", "base"}
    assert turn.replies["adapter"] != turn.replies["base"]
    assert turn.replies["adapter"] in columns["adapter"] and turn.replies["base"] in columns["base"]
    assert "base (adapter off)" in columns["base"]
    # back to one side: its column only, the other side's reply to that turn not in it
    widget.adapter.value = "off"
    assert set(_columns(widget)) == {"base"}


def test_stop_button_ends_the_reply():
    model, _ = adapted_lm(max_position_embeddings=4096)
    talk_slowly(model, 0.02)
    ns = {"model": model}
    widget = _chat(ns, temperature=1.0, max_new_tokens=2000)
    widget.message.value = "Go"
    widget.send_button.click()
    reply = widget.reply
    assert reply is not None and not reply.done, widget.status.value
    assert widget.send_button.disabled and not widget.stop_button.disabled and widget.adapter.disabled
    deadline = time.monotonic() + 60
    while "jl-chat-streaming'>" not in widget.transcript.value or not reply.texts["adapter"]:
        assert time.monotonic() < deadline, "no text streamed"
        time.sleep(0.05)
    widget.send("another")  # refused while generating: said in the status line
    assert "A reply is being generated" in widget.status.value
    widget.stop_button.click()
    reply.wait(30)
    assert reply.done and reply.stopped
    assert "stopped" in widget.status.value
    assert "[stopped]" in widget.transcript.value
    assert reply.texts["adapter"] in _columns(widget)["adapter"]
    assert not widget.send_button.disabled and widget.stop_button.disabled


def test_streaming_redraws_are_throttled(ns):
    now = [0.0]
    conversation = jl.Conversation(ns["model"], chat_tokenizer(), temperature=0.9, max_new_tokens=60)
    widget = ChatWidget(conversation, min_interval=0.1, clock=lambda: now[0])
    talk_slowly(ns["model"], 0.0)  # words: several pieces arrive
    draws = []
    widget.transcript.observe(lambda change: draws.append(change["new"]), names="value")
    _send(widget, "Hi")
    pieces = sum(1 for _ in widget.reply.texts["adapter"].split(" "))
    assert pieces > 3
    # the clock never moved: one redraw for the first piece, one for the end, one for the refreshed buttons
    assert len(draws) <= 3, len(draws)
    assert widget.conversation.turns[-1].replies["adapter"] in draws[-1]


def test_a_tokenizer_without_template_is_noted(ns):
    widget = jl.chat(ns["model"], tiny_tokenizer())
    assert "no chat template" in widget.note.value
    assert _chat(ns).note.value == ""


def test_a_plain_model_cannot_go_side_by_side():
    model = tiny_model("llama", vocab_size=98)
    widget = jl.chat(model, chat_tokenizer())
    assert widget.adapter.disabled
    assert widget.conversation.sides == ("base",)
    widget.adapter.value = "side_by_side"
    assert "has no LoRA adapter" in widget.status.value
    assert widget.adapter.value == "on" and widget.conversation.settings["adapter"] == "on"
    assert "model" in _columns(widget)["base"]


def test_the_widget_follows_its_variable(ns):
    widget = _chat(ns, temperature=0, max_new_tokens=6)
    first = ns["model"]
    _send(widget, "Hi")
    ns["model"] = jl.merge(first)  # what %lora merge model does to the variable
    _send(widget, "Again")
    assert widget.conversation.model is ns["model"]
    assert widget.conversation.turns[-1].replies.keys() == {"base"}  # the merged model holds no adapter now
    assert "model" in _columns(widget)["base"]

    ns["model"] = 3
    widget.message.value = "Hello?"
    widget.send_button.click()
    status = html.unescape(re.sub(r"<[^>]+>", "", widget.status.value))
    assert status == "`model` no longer holds a model (now: int): put the model back in it, or start a new chat " \
                     "with %lora chat MODEL."  # fmt: skip
    assert widget.message.value == "Hello?"  # kept, to send again
    del ns["model"]
    widget.send_button.click()
    assert "(now: not defined)" in widget.status.value
    assert len(widget.conversation.turns) == 2


def test_a_model_in_training_is_refused_in_the_status_line(ns):
    widget = _chat(ns)

    class Running:  # what the engine registers for a run in progress
        done, step, total_steps = False, 3, 10

    assert runs.register(ns["model"], Running())
    try:
        widget.message.value = "Hi"
        widget.send_button.click()
        assert widget.reply is None
        assert "Cannot generate while this model is training (step 3/10)" in html.unescape(
            widget.status.value
        )
        with pytest.raises(jl.UsageError, match=r"training \(step 3/10\)"):
            jl.chat(ns["model"], chat_tokenizer())
    finally:
        runs.finish(ns["model"])
    _send(widget, "Hi")
    assert widget.status.value == ""


def test_a_failure_in_generation_is_shown(ns, monkeypatch):
    widget = _chat(ns, max_new_tokens=4)

    def broken(**kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ns["model"], "generate", broken)
    _send(widget, "Hi")
    assert "RuntimeError: simulated failure" in widget.status.value
    assert not widget.send_button.disabled and widget.conversation.turns == []


def test_a_reply_that_ends_before_send_returns_keeps_its_final_state(ns, monkeypatch):
    """A failure (or a one-token reply) can end on the reply's thread before ``send`` has drawn "generating …":
    the view must end showing the failure with Send enabled, whichever thread gets there first."""
    widget = _chat(ns, max_new_tokens=4)

    def broken(**kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ns["model"], "generate", broken)
    start = widget.conversation.start

    def start_and_let_the_thread_win(*args, **kwargs):
        reply = start(*args, **kwargs)
        reply._done.wait(1.0)  # the reply's thread ends first (or, holding for the view, cannot)
        return reply

    monkeypatch.setattr(widget.conversation, "start", start_and_let_the_thread_win)
    _send(widget, "Hi")
    assert "RuntimeError: simulated failure" in widget.status.value
    assert not widget.send_button.disabled and widget.stop_button.disabled


def test_clear_starts_afresh(ns):
    widget = _chat(ns, temperature=0, max_new_tokens=4)
    _send(widget, "Hi")
    widget.clear_button.click()
    assert widget.conversation.turns == [] and "jl-chat-user" not in widget.transcript.value


def test_classifier_shows_adapter_and_base_probabilities():
    base = tiny_model("bert", vocab_size=98)
    base.config.id2label = {0: "sad", 1: "meh", 2: "glad"}
    model = jl.inject(base, r=4, targets="attention")
    randomize_lora_b(model)
    widget = jl.chat(model, tiny_tokenizer(), variable="clf", namespace={"clf": model})
    assert isinstance(widget, ClassifierWidget)
    widget.text.value = "so so"
    widget.classify_button.click()
    result = widget.result
    assert result == widget.conversation.classify("so so")
    table = widget.table.value
    assert re.findall(r"class='jl-cls-label'>(\w+)<", table) == ["sad", "meh", "glad"]
    shown = [float(x) for x in re.findall(r"class='jl-cls-prob'>([\d.]+)<", table)]
    expected = [round(result.probs[side][i], 3) for i in range(3) for side in ("adapter", "base")]
    assert shown == pytest.approx(expected, abs=1e-9)
    widget.text.value = "  "
    widget.classify_button.click()
    assert "The message must be non-empty text" in widget.status.value
