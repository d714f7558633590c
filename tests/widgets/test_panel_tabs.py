"""The panel's tabs without a kernel: "Adapter" holds what the panel always showed, "Data" previews the data the
training form names with the form's settings (the same preview as ``jupyter_lora.preview_data``; a wrong value is
its one-line message), "Chat" is built when first opened and talks to the panel's model."""

from __future__ import annotations

import html

import pytest
from chat_models import TEMPLATE, adapted_lm, chat_tokenizer

import jupyter_lora as jl
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_model, tiny_tokenizer
from jupyter_lora.widgets.chat import ChatWidget
from jupyter_lora.widgets.panel import TABS, Panel

BODIES = [{"title": f"note {i}", "body": "words " * (i % 7 + 1)} for i in range(16)]
RECORDS = [{"prompt": f"Question {i}: ", "response": "answer " * (i * 5 % 9 + 1)} for i in range(24)]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": "hello " * (i % 4 + 1)},
        ]
    }
    for i in range(12)
]


@pytest.fixture
def ns():
    return {
        "model": tiny_model("llama"),
        "tok": tiny_tokenizer(),
        "records": RECORDS,
        "chats": CHATS,
        "bodies": BODIES,
    }


def _panel(ns, **kw):
    return Panel(ns["model"], variable="model", namespace=ns, **kw)


def _fill(panel, form: dict[str, object]) -> None:
    for name, value in form.items():
        panel.form[name].value = value


def _widgets_under(widget) -> list:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += _widgets_under(child)
    return found


def _shown(panel) -> dict[str, str]:
    (output,) = panel.preview_output.outputs
    assert output["output_type"] == "display_data"
    return output["data"]


# ----------------------------------------------------------------------------------------------- the tabs


def test_three_tabs_the_adapter_tab_holds_the_panel_as_it_was(ns):
    panel = jl.panel(ns["model"], variable="model", namespace=ns)
    assert isinstance(panel, Panel) and "panel" in jl.__all__
    assert panel.tabs.titles == TABS == ("Adapter", "Data", "Chat") and panel.tabs.selected_index == 0
    assert panel.box.children == (panel.tabs,) and "jl-panel" in panel.box._dom_classes
    assert list(panel.tabs.children) == [panel.adapter_tab, panel.data_tab, panel.chat_tab]
    adapter = {id(x) for x in _widgets_under(panel.adapter_tab)}
    for part in (panel.tree, panel.r, panel.alpha, panel.summary, panel.error, panel.inject_button,
                 panel.train_button, panel.advanced, panel.code, *panel.form.values()):  # fmt: skip
        assert id(part) in adapter
    data = {id(x) for x in _widgets_under(panel.data_tab)}
    assert {id(panel.preview_button), id(panel.preview_output), id(panel.preview_message)} <= data
    assert not adapter & data


def test_panel_function_passes_its_tokenizer_and_options(ns):
    other = tiny_tokenizer()
    panel = jl.panel(ns["model"], other, variable="model", namespace=ns, r=8, lr=1e-4)
    assert panel.tokenizer is other and panel.r.value == 8 and panel.form["lr"].value == "0.0001"
    with pytest.raises(UsageError, match="Unknown panel setting `rnak`"):
        jl.panel(ns["model"], rnak=8)


# ----------------------------------------------------------------------------------------------- the Data tab


@pytest.mark.parametrize(
    ("data", "form", "expected"),
    [
        (
            "records",
            {"seq": "24", "packing": True, "eval": "0.25", "batch": "4", "seed": "7"},
            {"seq": 24, "packing": True, "eval": 0.25, "batch": 4, "seed": 7},
        ),
        (
            "chats",
            {"chat_template": TEMPLATE, "seq": "40", "eval": "0"},
            {"chat_template": TEMPLATE, "seq": 40, "eval": 0},
        ),
        ("bodies", {"text_column": "body", "seq": "9"}, {"text_column": "body", "seq": 9}),
    ],
    ids=["packing-eval-seq", "chat-template", "text-column"],
)
def test_the_data_preview_is_preview_data_with_the_forms_settings(ns, data, form, expected):
    panel = _panel(ns)
    _fill(panel, {"data": data, **form})
    panel.preview_n.value = 2
    assert panel.last_preview is None and panel.preview_output.outputs == ()
    shown = panel.preview()
    assert panel.preview_message.value == "", panel.preview_message.value
    wanted = jl.preview_data(ns["model"], ns[data], ns["tok"], n=2, **expected)
    assert shown == wanted and panel.last_preview is shown
    try:  # the settings made a difference
        plain = jl.preview_data(ns["model"], ns[data], ns["tok"], n=2)
    except UsageError:
        plain = None
    assert shown != plain
    out = _shown(panel)
    assert out["text/plain"] == repr(wanted)
    assert "jl-data-preview" in out["text/html"]
    if data != "bodies":  # prompts and user turns: masked (label -100)
        assert "class='jl-masked'" in out["text/html"]
    assert f"seq {expected['seq']}" in out["text/html"]


def test_the_preview_is_made_on_demand_and_says_when_the_form_changed(ns):
    panel = _panel(ns)
    _fill(panel, {"data": "records", "seq": "24"})
    assert panel.preview_output.outputs == ()  # typing previews nothing
    panel.preview_button.click()
    first = panel.last_preview
    assert first is not None and first.seq == 24
    panel.form["seq"].value = "32"
    assert panel.last_preview is first and _shown(panel)["text/plain"] == repr(first)  # not on every key
    assert "jl-preview-stale" in panel.preview_message.value
    panel.form["seq"].value = "24"  # back to what the preview shows
    assert panel.preview_message.value == ""
    panel.form["seq"].value = "32"
    panel.preview_button.click()
    assert panel.last_preview.seq == 32 and panel.preview_message.value == ""
    assert panel.estimate.seq == 32  # the memory figure followed the same field meanwhile


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"data": ""}, "Name the training data in the `data` field of the training form (Adapter tab)"),
        ({"data": "recrods"}, "`data`: no variable `recrods` in the notebook"),
        (
            {"seq": "zero"},
            "Fix the training settings first: `seq` must be a whole number like 512, got 'zero'",
        ),
        ({"text_column": "body"}, None),  # refused by the preview itself: its own message
    ],
    ids=["no-data", "misspelled-variable", "bad-seq", "no-such-column"],
)
def test_a_wrong_value_shows_its_one_line_message_in_the_data_tab(ns, form, message):
    panel = _panel(ns)
    _fill(panel, {"data": "records"})
    assert panel.preview() is not None  # shown before: a failed preview does not leave it looking current
    _fill(panel, form)
    assert panel.preview() is None and panel.last_preview is None and panel.preview_output.outputs == ()
    shown = html.unescape(panel.preview_message.value)
    if message is None:
        with pytest.raises(UsageError) as caught:
            jl.preview_data(ns["model"], ns["records"], ns["tok"], **form)
        message = str(caught.value)
    assert "jl-panel-error" in shown and message in shown, shown
    assert "Traceback" not in shown and "\n" not in shown
    assert panel.error.value == ""  # said in the Data tab, not in the Adapter tab's message line


# ----------------------------------------------------------------------------------------------- the Chat tab


@pytest.fixture
def chat_ns():
    model, _ = adapted_lm()
    return {"model": model, "tok": chat_tokenizer()}


def test_the_chat_is_built_when_its_tab_is_first_opened_for_the_panels_model(chat_ns):
    panel = _panel(chat_ns)
    assert panel.chat is None and panel.chat_tab.children == (panel.chat_message,)
    panel.tabs.selected_index = TABS.index("Data")
    assert panel.chat is None  # other tabs build nothing
    panel.tabs.selected_index = TABS.index("Chat")
    chat = panel.chat
    assert isinstance(chat, ChatWidget) and chat.box in panel.chat_tab.children
    assert chat.conversation.model is panel.model is chat_ns["model"]
    assert chat.conversation.tokenizer is chat_ns["tok"]  # the one tokenizer in the notebook
    assert panel.chat_message.value == ""
    panel.tabs.selected_index = 0
    panel.tabs.selected_index = TABS.index("Chat")
    assert panel.chat is chat  # built once: the conversation stays
    chat.controls["temperature"].value = 0
    chat.controls["max_new_tokens"].value = 6
    chat.message.value = "Hello"
    chat.send_button.click()
    assert chat.reply is not None, chat.status.value
    chat.reply.wait(60)
    assert chat.conversation.turns[-1].replies["adapter"]


def test_the_chat_follows_the_panels_model(chat_ns):
    panel = _panel(chat_ns)
    chat = panel.open_chat()
    assert chat.conversation.adapter_name == "default" and not chat.adapter.disabled
    panel.merge_button.click()  # the panel's own action
    assert chat.conversation.model is chat_ns["model"] is panel.model
    assert chat.conversation.adapter_name is None and chat.adapter.disabled
    chat_ns["model"] = jl.inject(chat_ns["model"], r=4, targets="qv")  # a cell changed the variable
    panel._after_cell()
    assert chat.conversation.model is chat_ns["model"] and not chat.adapter.disabled
    assert panel.open_chat() is chat

    # no notebook: the panel holds the model itself
    alone = Panel(adapted_lm()[0], tokenizer=chat_tokenizer())
    chat = alone.open_chat()
    assert chat.conversation.model is alone.model and chat.conversation.tokenizer is alone.tokenizer
    alone.unload_button.click()
    assert chat.conversation.model is alone.model and chat.conversation.adapter_name is None


def test_the_chat_uses_the_tokenizer_the_form_names(chat_ns):
    chat_ns["tok2"] = chat_tokenizer()
    panel = _panel(chat_ns)
    assert panel.open_chat() is None  # two tokenizers in the notebook, none named, none beside the model
    message = panel.chat_message.value
    assert "jl-panel-error" in message and "tokenizer" in message and "\n" not in message
    panel.form["tokenizer"].value = "tok2"
    chat = panel.open_chat()
    assert chat.conversation.tokenizer is chat_ns["tok2"] and panel.chat_message.value == ""
    panel.form["tokenizer"].value = "tok3"
    assert panel.open_chat() is chat  # the form's message, and the chat shown stays
    assert "no variable `tok3`" in panel.chat_message.value
    panel.form["tokenizer"].value = "tok"
    rebuilt = panel.open_chat()
    assert rebuilt is not chat and rebuilt.conversation.tokenizer is chat_ns["tok"]
    assert panel.chat_tab.children == (panel.chat_message, rebuilt.box)


def test_chat_settings_start_the_chat_and_are_checked_at_once(chat_ns):
    panel = _panel(chat_ns, chat_settings={"temperature": 0.25, "max_new_tokens": 7})
    chat = panel.open_chat()
    assert chat.controls["temperature"].value == 0.25 and chat.conversation.settings["max_new_tokens"] == 7
    with pytest.raises(UsageError, match="`temperature`"):
        _panel(chat_ns, chat_settings={"temperature": -1})


def test_the_magics_panel_gets_the_notebooks_chat_defaults():
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython() or __import__("IPython").get_ipython()
    if "jupyter_lora" not in ip.extension_manager.loaded:
        ip.extension_manager.load_extension("jupyter_lora")
    ip.user_ns["tabs_model"] = adapted_lm()[0]
    ip.user_ns["tabs_tok"] = chat_tokenizer()
    try:
        ip.run_line_magic("config", "LoraMagics.default_temperature = 0.3")
        panel = ip.run_line_magic("lora", "panel tabs_model")
        chat = panel.open_chat()
        assert chat.conversation.settings["temperature"] == 0.3
        assert chat.conversation.model is ip.user_ns["tabs_model"]
    finally:
        ip.run_line_magic("config", "LoraMagics.default_temperature = 0.7")
        for name in ("tabs_model", "tabs_tok"):
            ip.user_ns.pop(name, None)
