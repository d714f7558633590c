"""Chat with the model: ``jupyter_lora.chat(model)`` or ``%lora chat model``.

* ``ChatWidget`` (causal and seq2seq LMs): the conversation, one column per side (adapter, base, or both side by
  side), a message box with Send / Stop / Clear, and sliders for the ``chat`` settings of the schema. Replies stream
  in from a background thread (``Conversation.start``), so the kernel stays free; Stop ends generation at the next
  token.
* ``ClassifierWidget`` (text, image and audio classifiers): a text box — for an image or audio model a file upload
  and a path box, with the image's thumbnail or the clip's length — and the class probabilities, adapter and base
  side by side.
* ``TranscriptWidget`` (speech recognition): a file upload and a path box; each clip's transcript with the adapter
  and without it, one column per side.

Both drive a core ``Conversation`` and hold no generation logic of their own. Given ``namespace`` and ``variable``
(what ``%lora chat`` passes), they follow the variable: after a merge, an unload or a new inject they talk to the
model it holds now, and say so in one line when it no longer holds a model.
"""

from __future__ import annotations

import html
import io
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import ipywidgets as w

from ..core.errors import UsageError
from ..settings import SETTINGS, Setting

__all__ = ["ChatWidget", "ClassifierWidget", "TranscriptWidget", "chat"]

_SLIDERS = ("temperature", "top_p", "max_new_tokens")  # the chat settings shown as sliders
_ADAPTER_WORDS = {"on": "adapter on", "off": "adapter off", "side_by_side": "side by side"}
_MIN_INTERVAL = 0.1  # seconds between two redraws of a streaming reply
_SLIDER_MIN_WIDTH = "320px"  # a slider's label, track and readout whole
_SUBMIT_WINDOW = (
    1.0  # seconds: a button press this soon after the path box ran the model on the same path is that
)
_CSS = """<style>
.jl-chat-cols{display:flex;gap:10px;align-items:flex-start}
.jl-chat-col{flex:1;min-width:0;border:1px solid var(--jp-border-color2,#ddd);border-radius:4px;padding:4px 6px}
.jl-chat-head{font-weight:600;font-size:90%;color:#555;margin-bottom:4px}
.jl-chat-msg{white-space:pre-wrap;word-break:break-word;margin:3px 0;padding:3px 6px;border-radius:4px}
.jl-chat-user{background:var(--jp-layout-color2,#eef);margin-left:15%}
.jl-chat-reply{background:var(--jp-layout-color1,#fff);border-left:3px solid #42a5f5}
.jl-chat-base .jl-chat-reply{border-left-color:#90a4ae}
.jl-chat-lent{opacity:.6;font-style:italic}
.jl-chat-stopped-mark{color:#b26a00;font-size:85%}
.jl-cls td,.jl-cls th{padding:2px 8px;text-align:left}
.jl-cls-bar{display:inline-block;height:10px;background:#42a5f5;vertical-align:middle;margin-right:4px}
.jl-cls-base .jl-cls-bar{background:#90a4ae}
.jl-media-thumb img{image-rendering:pixelated;border:1px solid var(--jp-border-color2,#ddd)}
.jl-media-what{color:#555;font-size:90%}
</style>"""


def _slider(setting: Setting, value: Any) -> w.Widget:
    """A slider for one chat setting, its range from the declaration (widened to a value beyond it)."""
    lo, hi, step = setting.panel_range or (setting.minimum or 0, setting.maximum or 1, 1)
    lo, hi = min(lo, value), max(hi, value)
    common = {
        "value": value,
        "min": lo,
        "max": hi,
        "step": step,
        "description": setting.name.replace("_", " "),
        "tooltip": setting.help,
        "continuous_update": False,
        "style": {"description_width": "110px"},
        # keeps a usable track: in a narrow output the row wraps instead of squeezing the sliders
        "layout": w.Layout(min_width=_SLIDER_MIN_WIDTH),
    }
    if setting.kind == "int":
        return w.IntSlider(
            **{k: int(v) if k in ("value", "min", "max", "step") else v for k, v in common.items()}
        )
    return w.FloatSlider(readout_format=".2f", **common)


def _wrapping(children: list[w.Widget]) -> w.HBox:
    """A row of controls that wraps to the next line where the output is too narrow for all of them."""
    return w.HBox(children, layout=w.Layout(flex_flow="row wrap", align_items="center"))


def _escape(text: str) -> str:
    return html.escape(text, quote=False)


class _ModelView:
    """What both widgets share: the conversation, following the notebook variable, the status line."""

    def __init__(self, conversation: Any, variable: str | None, namespace: MutableMapping[str, Any] | None):
        self.conversation = conversation
        self.variable = variable
        self.namespace = namespace
        self.status = w.HTML()
        self.status.add_class("jl-chat-status")

    def follow(self) -> None:
        """Talk to the model the variable holds now; a UsageError when it holds none."""
        if self.namespace is None or self.variable is None:
            return
        missing = object()
        current = self.namespace.get(self.variable, missing)
        if current is self.conversation.model:
            return
        if not callable(getattr(current, "named_modules", None)):  # not a torch module
            now = "not defined" if current is missing else type(current).__name__
            raise UsageError(
                f"`{self.variable}` no longer holds a model (now: {now}): put the model back in it, or start a new "
                "chat with %lora chat MODEL."
            )
        self.conversation.use_model(current)

    def use_model(self, model: Any) -> None:
        """Talk to ``model`` from now on (the conversation so far is kept): what following a variable does, for a
        caller that holds the model itself (the panel's Chat tab)."""
        self.conversation.use_model(model)
        self._refresh()

    def _refresh(self) -> None:
        """The controls, from the state (the chat's buttons and adapter switch; a classifier has none)."""

    def _show(self, message: str, kind: str = "note") -> None:
        color = {"error": "#c62828", "note": "#555", "ok": "#2e7d32"}[kind]
        self.status.value = (
            f"<div class='jl-chat-{kind}' style='color:{color}'>{_escape(message)}</div>" if message else ""
        )

    def _error(self, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
        self._show(message, "error")

    def _side_label(self, side: str) -> str:
        name = self.conversation.adapter_name
        if side == "adapter":
            return f"adapter {name!r}" if name else "adapter"
        return "base (adapter off)" if name else "model"

    def show(self) -> None:
        from IPython.display import display

        display(self.box)

    def _ipython_display_(self) -> None:
        self.show()


class ChatWidget(_ModelView):
    """A chat with a causal or seq2seq LM. ``send(text)`` does what the Send button does; ``stop()`` what Stop
    does; ``conversation`` holds the turns and the settings; ``reply`` is the latest ``Reply``."""

    def __init__(
        self,
        conversation: Any,
        *,
        variable: str | None = None,
        namespace: MutableMapping[str, Any] | None = None,
        min_interval: float = _MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(conversation, variable, namespace)
        self.min_interval = min_interval
        self._clock = clock
        self._last_draw = -float("inf")
        self._draw_lock = threading.Lock()
        # Held while send() sets up the view of a new reply, and by _on_done (on the reply's thread): a reply that
        # ends at once (a failure, one token) must not have its final state overwritten by "generating …".
        self._state_lock = threading.Lock()
        self.reply: Any = None
        self._reverting = False
        settings = conversation.settings

        self.controls: dict[str, w.Widget] = {
            name: _slider(SETTINGS[name], settings[name]) for name in _SLIDERS
        }
        self.adapter = w.ToggleButtons(
            options=[(_ADAPTER_WORDS[c], c) for c in SETTINGS["adapter"].choices],
            value=settings["adapter"],
            tooltips=[SETTINGS["adapter"].help] * len(SETTINGS["adapter"].choices),
            style={"button_width": "105px"},
        )
        self.controls["adapter"] = self.adapter
        self.transcript = w.HTML()
        self.transcript.add_class("jl-chat-transcript")
        self.note = w.HTML()
        self.message = w.Textarea(
            placeholder="Message",
            layout=w.Layout(width="100%", height="60px"),
        )
        self.message.add_class("jl-chat-input")
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        for button, cls in ((self.send_button, "jl-chat-send"), (self.stop_button, "jl-chat-stop"),
                            (self.clear_button, "jl-chat-clear")):  # fmt: skip
            button.add_class(cls)

        for control in self.controls.values():
            control.observe(self._on_setting, names="value")
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop(wait=False))
        self.clear_button.on_click(lambda _: self.clear())

        self.box = w.VBox(
            [
                w.HTML(_CSS),
                _wrapping([self.controls["temperature"], self.controls["top_p"]]),
                _wrapping([self.controls["max_new_tokens"], self.adapter]),
                self.note,
                self.transcript,
                self.message,
                w.HBox([self.send_button, self.stop_button, self.clear_button]),
                self.status,
            ],
            layout=w.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="6px"),
        )
        self.box.add_class("jl-chat")
        self._refresh()

    # --------------------------------------------------------------------------------------- state

    @property
    def generating(self) -> bool:
        """Whether a reply is being generated now."""
        return self.reply is not None and not self.reply.done

    def _refresh(self) -> None:
        """Buttons, the adapter control and the note, from the state."""
        busy = self.generating
        self.send_button.disabled = busy
        self.stop_button.disabled = not busy
        self.clear_button.disabled = busy
        try:
            has_adapter = self.conversation.adapter_name is not None
        except UsageError:  # a stale model: said when sending
            has_adapter = False
        self.adapter.disabled = busy or not has_adapter
        note = self.conversation.note
        self.note.value = (
            f"<div class='jl-chat-plain-note' style='color:#8a6d00'>{_escape(note)}</div>" if note else ""
        )
        self._draw()

    # --------------------------------------------------------------------------------------- events

    def _on_setting(self, change: dict) -> None:
        if self._reverting:
            return
        name = next(k for k, c in self.controls.items() if c is change["owner"])
        try:
            self.conversation.configure(**{name: change["new"]})
        except UsageError as exc:  # nothing changed in the conversation: the control goes back too
            self._reverting = True
            try:
                self.controls[name].value = change["old"]
            finally:
                self._reverting = False
            self._error(exc)
            return
        self._show("")
        self._draw()

    def send(self, text: str | None = None) -> Any:
        """Send ``text`` (default: the message box's text) and stream the reply; returns the ``Reply`` (None
        when the message was refused: the reason is in the status line)."""
        text = self.message.value if text is None else text
        self._show("")
        with self._state_lock:
            try:
                self.follow()
                reply = self.conversation.start(text, on_text=self._on_text, on_done=self._on_done)
            except UsageError as exc:
                self._error(exc)
                self._refresh()
                return None
            self.reply = reply
            self.message.value = ""
            self._show(f"generating ({', '.join(self._side_label(s) for s in reply.sides)}) …")
            self._refresh()
        return reply

    def stop(self, wait: bool = True) -> None:
        """End the reply being generated (at the next token)."""
        if self.reply is not None and not self.reply.done:
            self._show("stopping …")
            self.reply.stop(wait=wait)

    def clear(self) -> None:
        """Start the conversation afresh."""
        self.conversation.clear()
        self._show("")
        self._draw()

    def _on_text(self, side: str, text: str) -> None:
        now = self._clock()
        if now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self._draw()

    def _on_done(self, reply: Any) -> None:
        with self._state_lock:
            self._finish(reply)

    def _finish(self, reply: Any) -> None:
        if reply.error is not None:
            self._error(reply.error)
        elif reply.stopped:
            self._show("stopped", "note")
        else:
            self._show("")
        self.send_button.disabled = False
        self.stop_button.disabled = True
        self.clear_button.disabled = False
        try:
            self.adapter.disabled = self.conversation.adapter_name is None
        except UsageError:
            self.adapter.disabled = True
        self._draw(reply)

    # --------------------------------------------------------------------------------------- rendering

    def _draw(self, finished: Any = None) -> None:
        """Redraw the conversation (one column per side) with the reply in progress, if any."""
        with self._draw_lock:
            self.transcript.value = self.transcript_html(finished)

    def transcript_html(self, finished: Any = None) -> str:
        """The conversation as HTML: one column per side that answers now, each with its own replies."""
        reply = self.reply if self.reply is not None and self.reply is not finished else None
        if reply is not None and reply.done:
            reply = None
        try:
            sides = reply.sides if reply is not None else self.conversation.sides
        except UsageError:
            sides = ("adapter", "base")
        columns = []
        for side in sides:
            parts = [f"<div class='jl-chat-head'>{_escape(self._side_label(side))}</div>"]
            for turn in self.conversation.turns:
                parts.append(f"<div class='jl-chat-msg jl-chat-user'>{_escape(turn.user)}</div>")
                text = turn.replies.get(side)
                lent = text is None
                if lent:  # this side did not answer that turn: the other side's reply, as its prompt holds it
                    text = next(iter(turn.replies.values()), "")
                stopped = " <span class='jl-chat-stopped-mark'>[stopped]</span>" if turn.stopped else ""
                cls = "jl-chat-msg jl-chat-reply" + (" jl-chat-lent" if lent else "")
                parts.append(f"<div class='{cls}'>{_escape(text)}{stopped}</div>")
            if reply is not None:
                parts.append(f"<div class='jl-chat-msg jl-chat-user'>{_escape(reply.user)}</div>")
                cursor = " ▍" if reply.side == side else ""
                parts.append(
                    f"<div class='jl-chat-msg jl-chat-reply jl-chat-streaming'>{_escape(reply.texts.get(side, ''))}"
                    f"{cursor}</div>"
                )
            columns.append(f"<div class='jl-chat-col jl-chat-{side}'>{''.join(parts)}</div>")
        return f"<div class='jl-chat-cols'>{''.join(columns)}</div>"

    def __repr__(self) -> str:
        where = f" for `{self.variable}`" if self.variable else ""
        return (
            f"<jupyter_lora chat{where}: {len(self.conversation.turns)} turns, adapter {self.adapter.value}>"
        )


class _MediaInput:
    """The input of an image or audio model: a ``FileUpload`` (``accept`` image/* or audio/*) and a box for a file's
    path, and a preview of what was given: the image's thumbnail, or the clip's length and a player. An upload runs
    the model at once (and empties the path box); the button runs it on the path typed, else on the last upload."""

    conversation: Any
    status: w.HTML

    def _media_row(self, button: w.Button) -> w.HBox:
        media = self.conversation.media
        self.upload = w.FileUpload(
            accept=f"{media}/*", multiple=False, description=f"Upload {media}", layout=w.Layout(width="auto")
        )
        self.upload.add_class("jl-media-upload")
        # continuous_update=False: the value reaches the kernel on Enter (or when the box loses focus), which runs
        # the model on the path (ipywidgets 8's way to submit a Text; on_submit is deprecated there)
        self.path = w.Text(
            placeholder=f"or the path of {'an image' if media == 'image' else 'a sound'} file",
            continuous_update=False,
            layout=w.Layout(width="320px"),
        )
        self.path.add_class("jl-media-path")
        self.preview = w.VBox()
        self.preview.add_class("jl-media-preview")
        self._submitted: tuple[str, float] | None = None
        self.upload.observe(self._on_upload, names="value")
        self.path.observe(self._on_path, names="value")
        button.on_click(lambda _: self._on_button())
        return _wrapping([self.upload, self.path, button])

    def _on_upload(self, change: dict) -> None:
        if change["new"]:
            self.path.value = ""
            self.run()

    def _on_path(self, change: dict) -> None:
        path = str(change["new"]).strip()
        if path:
            self._submitted = (path, time.monotonic())
            self.run()

    def _on_button(self) -> None:
        # Typing a path then pressing the button sends the path first (the box loses focus): it has run already.
        submitted, self._submitted = self._submitted, None
        just_run = submitted is not None and time.monotonic() - submitted[1] < _SUBMIT_WINDOW
        if just_run and submitted[0] == self.path.value.strip():
            return
        self.run()

    def _clear_shown(self) -> None:
        """After a refusal: the preview and results shown were the previous input's; they go."""
        self.preview.children = ()

    def run(self, x: Any = None) -> Any:  # pragma: no cover - each widget's own
        raise NotImplementedError

    def _given(self) -> tuple[Any, str]:
        """(what to run the model on, its name): the path typed, else the last file uploaded."""
        path = self.path.value.strip()
        if path:
            return path, path
        if self.upload.value:
            upload = self.upload.value[-1]
            name = str(upload["name"])
            # a datasets-style dict: the bytes, and the file's name for what is said about them
            return {"bytes": bytes(upload["content"]), "path": name}, name
        media = self.conversation.media
        raise UsageError(
            f"Upload {'an image' if media == 'image' else 'a sound file'} or type the path of one, then press "
            f"{'Transcribe' if self.conversation.kind == 'transcription' else 'Classify'}."
        )

    def _show_preview(self, x: Any, name: str | None, described: str) -> None:
        """The thumbnail of an image (its bytes: uploaded, read from its file, or a PIL image's PNG), or the length
        of a clip with a player, and what the model was given."""
        what = w.HTML(
            f"<div class='jl-media-what'>{_escape(' · '.join(filter(None, (name, described))))}</div>"
        )
        children: list[w.Widget] = []
        data = _file_bytes(x)
        if self.conversation.media == "image":
            data, kind = _image_bytes(x, data)
            if data is not None:
                thumb = w.Image(
                    value=data, format=kind, layout=w.Layout(max_width="128px", max_height="128px")
                )
                thumb.add_class("jl-media-thumb")
                children.append(thumb)
        else:
            seconds = described.removeprefix("audio ")
            what.value += f"<div class='jl-media-duration'>{_escape(seconds)}</div>"
            if data is not None and data[:4] == b"RIFF":
                player = w.Audio(value=data, format="wav", autoplay=False, loop=False)
                player.add_class("jl-media-player")
                children.append(player)
        self.preview.children = [*children, what]


def _file_bytes(x: Any) -> bytes | None:
    """The bytes of a file given as bytes, a path or a datasets dict (None: not a file, or not readable)."""
    if isinstance(x, Mapping):
        x = x.get("bytes") or x.get("path")
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, (str, os.PathLike)) and os.path.isfile(x):
        with open(x, "rb") as f:
            return f.read()
    return None


def _image_bytes(x: Any, data: bytes | None) -> tuple[bytes | None, str]:
    """An image's encoded bytes and their format for an ``ipywidgets.Image``: a file's own, or a PIL image's (or an
    array's) as PNG."""
    from PIL import Image

    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                return data, (image.format or "png").lower()
        except Exception:  # not an image PIL knows: no thumbnail (the model said what was wrong)
            return None, "png"
    if not isinstance(x, Image.Image):
        try:
            import numpy as np

            array = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                return None, "png"
            if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)
            x = Image.fromarray(array.squeeze())
        except Exception:  # not something PIL draws as is: no thumbnail
            return None, "png"
    out = io.BytesIO()
    x.convert("RGB").save(out, format="PNG")
    return out.getvalue(), "png"


class ClassifierWidget(_MediaInput, _ModelView):
    """Class probabilities, adapter and base side by side: of the text in the box for a sequence classifier; of an
    uploaded image or clip (or the file whose path is typed) for an image or audio classifier. ``classify(x)`` does
    what the Classify button does (``x``: text, or for an image or audio model anything ``Conversation.classify``
    takes); ``result`` is the latest ``Classification``."""

    def __init__(
        self,
        conversation: Any,
        *,
        variable: str | None = None,
        namespace: MutableMapping[str, Any] | None = None,
    ):
        super().__init__(conversation, variable, namespace)
        self.result: Any = None
        self.classify_button = w.Button(description="Classify", button_style="primary", icon="tags")
        self.classify_button.add_class("jl-cls-classify")
        self.table = w.HTML()
        self.table.add_class("jl-cls-table")
        if conversation.media is None:
            self.text = w.Textarea(
                placeholder="Text to classify", layout=w.Layout(width="100%", height="60px")
            )
            self.text.add_class("jl-cls-input")
            self.classify_button.on_click(lambda _: self.classify())
            inputs: list[w.Widget] = [self.text, self.classify_button]
        else:
            inputs = [self._media_row(self.classify_button), self.preview]
        self.box = w.VBox(
            [w.HTML(_CSS), *inputs, self.table, self.status],
            layout=w.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="6px"),
        )
        self.box.add_class("jl-chat")

    def run(self, x: Any = None) -> Any:
        return self.classify(x)

    def classify(self, x: Any = None) -> Any:
        """The class probabilities of ``x`` (default: the box's text; for an image or audio model the path typed,
        else the last upload); None when refused (see the status line)."""
        self._show("")
        name = None
        try:
            self.follow()
            if x is None and self.conversation.media is None:
                x = self.text.value
            elif x is None:
                x, name = self._given()
            result = self.conversation.classify(x)
        except UsageError as exc:
            self._error(exc)
            if self.conversation.media is not None:
                self.result = None
                self.table.value = ""
                self._clear_shown()
            return None
        self.result = result
        if self.conversation.media is not None:
            self._show_preview(x, name, result.text)
        self.table.value = self.table_html(result)
        return result

    def table_html(self, result: Any) -> str:
        """One row per label, one column per side: the probability as a number and a bar."""
        sides = list(result.probs)
        head = "".join(f"<th class='jl-cls-{s}'>{_escape(self._side_label(s))}</th>" for s in sides)
        rows = []
        for i, label in enumerate(result.labels):
            cells = []
            for side in sides:
                p = result.probs[side][i]
                top = " style='font-weight:600'" if result.top(side) == label else ""
                cells.append(
                    f"<td class='jl-cls-{side}'{top}><span class='jl-cls-bar' style='width:{100 * p:.1f}px'></span>"
                    f"<span class='jl-cls-prob'>{p:.3f}</span></td>"
                )
            rows.append(f"<tr><td class='jl-cls-label'>{_escape(label)}</td>{''.join(cells)}</tr>")
        return f"<table class='jl-cls'><tr><th>label</th>{head}</tr>{''.join(rows)}</table>"

    def __repr__(self) -> str:
        where = f" for `{self.variable}`" if self.variable else ""
        return f"<jupyter_lora classifier view{where}>"


class TranscriptWidget(_MediaInput, _ModelView):
    """Speech recognition: an uploaded clip (or the sound file whose path is typed) transcribed with the adapter and
    without it, one column per side, the clips so far one under the other. ``transcribe(x)`` does what the
    Transcribe button does; ``results``: ``(name, Transcription)`` of each clip, ``result`` the latest."""

    def __init__(
        self,
        conversation: Any,
        *,
        variable: str | None = None,
        namespace: MutableMapping[str, Any] | None = None,
    ):
        super().__init__(conversation, variable, namespace)
        self.results: list[tuple[str, Any]] = []
        self.max_new_tokens = _slider(SETTINGS["max_new_tokens"], conversation.settings["max_new_tokens"])
        self.max_new_tokens.observe(self._on_max_new_tokens, names="value")
        self.transcribe_button = w.Button(description="Transcribe", button_style="primary", icon="microphone")
        self.transcribe_button.add_class("jl-asr-transcribe")
        self.transcript = w.HTML()
        self.transcript.add_class("jl-asr-transcripts")
        self.box = w.VBox(
            [w.HTML(_CSS), self.max_new_tokens, self._media_row(self.transcribe_button), self.preview,
             self.transcript, self.status],
            layout=w.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="6px"),
        )  # fmt: skip
        self.box.add_class("jl-chat")

    @property
    def result(self) -> Any:
        """The latest ``Transcription`` (None before the first)."""
        return self.results[-1][1] if self.results else None

    def _on_max_new_tokens(self, change: dict) -> None:
        try:
            self.conversation.configure(max_new_tokens=change["new"])
        except UsageError as exc:
            self._error(exc)

    def run(self, x: Any = None) -> Any:
        return self.transcribe(x)

    def transcribe(self, x: Any = None) -> Any:
        """The transcripts of ``x`` (default: the path typed, else the last upload); None when refused."""
        self._show("")
        name = None
        try:
            self.follow()
            if x is None:
                x, name = self._given()
            result = self.conversation.transcribe(x)
        except UsageError as exc:
            self._error(exc)
            self._clear_shown()  # the transcripts above stay: each names its own clip
            return None
        self.results.append((name or result.input, result))
        self._show_preview(x, name, result.input)
        self.transcript.value = self.transcripts_html()
        return result

    def transcripts_html(self) -> str:
        """One column per side; in each, every clip (its name and length) and that side's transcript of it."""
        sides = list(self.result.texts) if self.results else []
        columns = []
        for side in sides:
            parts = [f"<div class='jl-chat-head'>{_escape(self._side_label(side))}</div>"]
            for name, result in self.results:
                clip = name if name == result.input else f"{name} · {result.input}"
                parts.append(f"<div class='jl-chat-msg jl-chat-user'>{_escape(clip)}</div>")
                text = result.texts.get(side)
                shown = (
                    _escape(text) if text else "<i>(empty)</i>" if text is not None else "<i>(not run)</i>"
                )
                parts.append(f"<div class='jl-chat-msg jl-chat-reply jl-asr-text'>{shown}</div>")
            columns.append(f"<div class='jl-chat-col jl-chat-{side}'>{''.join(parts)}</div>")
        return f"<div class='jl-chat-cols'>{''.join(columns)}</div>"

    def __repr__(self) -> str:
        where = f" for `{self.variable}`" if self.variable else ""
        return f"<jupyter_lora transcript view{where}: {len(self.results)} clips>"


def chat(
    model: Any,
    tokenizer: Any = None,
    *,
    processor: Any = None,
    variable: str | None = None,
    namespace: MutableMapping[str, Any] | None = None,
    **settings: Any,
) -> ChatWidget | ClassifierWidget | TranscriptWidget:
    """Chat with ``model`` in the notebook: a ``ChatWidget`` for a causal or seq2seq LM (streaming replies, the
    adapter on, off or side by side), a ``ClassifierWidget`` for a text, image or audio classifier (class
    probabilities; images and clips uploaded or given by path), a ``TranscriptWidget`` for speech recognition.

    ``tokenizer``: default, the one saved beside the model's weights. ``processor``: for image, audio and
    vision-language models (default: the one saved beside the model). ``settings``: temperature, top_p,
    max_new_tokens, adapter (on | off | side_by_side), seed, system (see ``jupyter_lora.settings``).
    ``namespace``/``variable``: follow the model that ``namespace[variable]`` holds (what ``%lora chat`` passes).
    A model that is training now is refused."""
    from ..core.chat import Conversation

    conversation = Conversation(model, tokenizer, processor, **settings)
    conversation.check_not_training()
    if conversation.kind == "classification":
        return ClassifierWidget(conversation, variable=variable, namespace=namespace)
    if conversation.kind == "transcription":
        return TranscriptWidget(conversation, variable=variable, namespace=namespace)
    return ChatWidget(conversation, variable=variable, namespace=namespace)
