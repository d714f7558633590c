"""Chat with the model in a notebook variable: a conversation kept here, each reply made by transformers'
``generate`` on the model as it is now (PEFT's adapter on, off, or both side by side). No notebook code: the chat
widget (``jupyter_lora.widgets.chat``) drives a ``Conversation``.

* Causal and seq2seq LMs. A tokenizer with a chat template formats the whole conversation
  (``apply_chat_template`` with the generation prompt), so earlier turns are in every prompt; the oldest turns are
  left out when the conversation would outgrow the model's context. A tokenizer without a template continues each
  message as plain text, without the earlier turns (``Conversation.note`` says so).
* ``adapter``: ``on`` (the active adapter), ``off`` (inside PEFT's ``disable_adapter()``), ``side_by_side`` (both,
  one after the other, from the same sampling seed). Each side keeps its own conversation: its prompts hold its
  own earlier replies (a turn answered by the other side only lends that reply).
* Streaming: ``Conversation.start`` runs ``generate`` with a ``TextIteratorStreamer`` on a background thread and
  returns a ``Reply`` at once; ``Reply.stop()`` ends generation at the next token (a ``StoppingCriteria``).
  ``stream`` iterates the pieces; ``send`` generates without a streamer, in the calling thread.
* Sequence classifiers: ``Conversation.classify`` gives the class probabilities, with and without the adapter.
* Image and audio classifiers: ``classify(x)`` takes one image or clip in any form a training record's column takes
  (a PIL image, an array or tensor, a file path, bytes, a datasets ``Image``/``Audio`` dict, or a whole record),
  turned into inputs by the model's processor exactly as training batches are (``processor=``, else the one saved
  beside the model). Speech recognition: ``transcribe(x)`` gives the transcript with and without the adapter
  (greedy, at most ``max_new_tokens`` tokens). ``media`` says which ("image", "audio"; None for text).
* Vision-language models: ``send(text, images=[...])`` (and ``start``/``stream``) put images before the message's
  text; the model's processor (``processor=``, a processor passed as ``tokenizer``, or the one saved beside the
  model) renders the conversation, images of earlier turns included, and makes the model's inputs.

A model that a background run is training is refused (``runs.active_run``), as is a second message while a reply
is being generated.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..settings import defaults, validate
from .adapters.guards import check_not_training
from .adapters.peft_facts import active_names, wrapper_for
from .compare import class_labels, class_probabilities, input_device, transcript
from .data import find_tokenizer, vocab_size_of
from .data.processors import (
    MEDIA_TASKS,
    feature_extractor,
    find_processor,
    image_processor,
    is_processor,
    is_vision_language,
    pick_preprocessor,
    text_tokenizer,
    training_task,
)
from .data.tokenize import check_token_ids, has_chat_template, pad_token_id
from .errors import UsageError
from .modelinfo import base_model_of, detect_task, encoder_advice, require_module

__all__ = ["SIDES", "Classification", "Conversation", "Reply", "Transcription", "Turn"]

# The two ways a reply can be made: with the active adapter, and by the base model (adapter disabled).
SIDES = ("adapter", "base")
_GENERATION_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
_CLASSIFY_TASKS = ("SEQ_CLS", "IMAGE_CLS", "AUDIO_CLS")
# What a media model reads, by task: the word for the messages, and the part of its processor that reads it.
_MEDIA = {"IMAGE_CLS": "image", "AUDIO_CLS": "audio", "ASR": "audio"}
_READS = {"image": "images", "audio": "audio"}
_GIVE = {
    "image": "an image (a PIL image, an array or tensor, an image file's path or bytes, a datasets Image dict)",
    "audio": "a clip (an array of samples, a datasets Audio dict {'array', 'sampling_rate'}, a .wav file's path or "
    "bytes)",
}
_PLAIN_NOTE = (
    "This tokenizer has no chat template: each message is continued as plain text, without the earlier turns. "
    "For a conversation, use an instruct model's tokenizer or set tokenizer.chat_template."
)


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's message and the reply of each side that answered it (``adapter`` / ``base``).
    ``stopped``: generation was stopped before it ended (the replies are what had been generated). ``seed``: what
    both sides sampled from (the ``seed`` setting plus the turn's index, so a conversation replays exactly)."""

    user: str
    replies: Mapping[str, str]
    stopped: bool = False
    seed: int = 0
    images: tuple = ()


@dataclass(frozen=True)
class Classification:
    """Class probabilities of one input: ``probs[side]`` in the order of ``labels`` (side: adapter / base).
    ``text``: the text classified, or what an image or clip was ("image 32×32", "audio 1.50 s")."""

    text: str
    labels: tuple[str, ...]
    probs: Mapping[str, tuple[float, ...]]
    adapter_name: str | None = None

    def top(self, side: str) -> str:
        """The most likely label of ``side``."""
        probs = self.probs[side]
        return self.labels[max(range(len(probs)), key=probs.__getitem__)]

    def __repr__(self) -> str:
        sides = ", ".join(f"{side} {self.top(side)!r} ({max(p):.3f})" for side, p in self.probs.items())
        return f"Classification({self.text!r}: {sides})"


@dataclass(frozen=True)
class Transcription:
    """The transcript of one clip by each side: ``texts[side]`` (side: adapter / base). ``input``: what the clip was
    ("audio 1.50 s")."""

    input: str
    texts: Mapping[str, str]
    adapter_name: str | None = None

    def __repr__(self) -> str:
        sides = ", ".join(f"{side} {text!r}" for side, text in self.texts.items())
        return f"Transcription({self.input}: {sides})"


class _StopOnEvent(StoppingCriteria):
    """Ends generation once ``event`` is set (checked after every token)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Sample from ``seed``, then put torch's random state back as it was (the notebook's draws do not depend
    on how many replies were generated)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _context_limit(model: nn.Module) -> int | None:
    """How many positions a decoder-only model can attend over (None: no fixed limit, or encoder-decoder)."""
    config = getattr(base_model_of(model), "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_processor(model: nn.Module, tokenizer: Any, processor: Any) -> Any:
    """A vision-language model's processor: ``processor``, a processor passed as ``tokenizer``, or the one saved
    beside the model (None: the conversation is text only)."""
    if processor is not None and not is_processor(processor):
        raise UsageError(
            f"`processor` must be a transformers processor (AutoProcessor), got {type(processor).__name__}."
        )
    if processor is None and is_processor(tokenizer):
        processor = tokenizer
    if processor is None and is_vision_language(model):
        processor = find_processor(model)
    return processor


def _check_media_processor(model: nn.Module, task: str, processor: Any) -> None:
    """The processor of an image or audio model must hold the part that reads its input (and for speech
    recognition a tokenizer for the transcripts): refused when the chat opens, not at the first input."""
    name = type(base_model_of(model)).__name__
    if task == "IMAGE_CLS" and image_processor(processor) is None:
        need, loader = "an image processor", "AutoImageProcessor"
    elif task != "IMAGE_CLS" and feature_extractor(processor) is None:
        need, loader = "an audio feature extractor", "AutoProcessor"
    elif task == "ASR" and text_tokenizer(processor) is None:
        need, loader = (
            "a tokenizer for the transcripts (e.g. WhisperProcessor, Wav2Vec2Processor)",
            "AutoProcessor",
        )
    else:
        return
    raise UsageError(
        f"This model ({name}, task {task}) needs a processor with {need}; got {type(processor).__name__}. Pass "
        f"processor={loader}.from_pretrained(<the model's name or folder>)."
    )


def _find_tokenizer(model: nn.Module, tokenizer: Any) -> Any:
    if tokenizer is None:
        tokenizer = find_tokenizer(model)
    if tokenizer is None:
        raise UsageError(
            "`tokenizer` is needed to turn messages into tokens and none is saved beside the model: pass "
            "jupyter_lora.chat(model, tokenizer=tok) or %lora chat model --tokenizer tok."
        )
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise UsageError(
            f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}. Pass the result of "
            "AutoTokenizer.from_pretrained(...)."
        )
    return tokenizer


class Conversation:
    """A conversation with ``model``: a causal/seq2seq LM (``send``, ``start``, ``stream``), a text, image or audio
    classifier (``classify``), or a speech recognition model (``transcribe``).

    ``tokenizer``: default, the one saved beside the model's weights (``config._name_or_path``). ``processor``: for
    image, audio and vision-language models (default: the one saved beside the model). ``settings``: the ``chat``
    settings of ``jupyter_lora.settings`` (temperature, top_p, max_new_tokens, adapter, seed, system); change them
    later with ``configure``. ``turns``: the exchanges so far.
    """

    def __init__(self, model: Any, tokenizer: Any = None, processor: Any = None, **settings: Any):
        self.settings: dict[str, Any] = {**defaults("chat"), **validate(settings, "chat")}
        self.turns: list[Turn] = []
        self._reply: Reply | None = None
        self._lock = threading.Lock()
        self.task: str | None = None
        self.use_model(model)
        if self.task in MEDIA_TASKS:
            # the processor training would use: the one given (or passed as tokenizer), else the one beside the model
            self.processor = pick_preprocessor(self.model, self.task, tokenizer, processor)
            _check_media_processor(self.model, self.task, self.processor)
            self.tokenizer = text_tokenizer(self.processor)  # speech recognition: the transcripts' tokenizer
        else:
            self.processor = _find_processor(self.model, tokenizer, processor)
            if self.processor is not None and text_tokenizer(self.processor) is not None:
                tokenizer = text_tokenizer(self.processor)
            self.tokenizer = _find_tokenizer(self.model, tokenizer)
        self._sides()  # an adapter setting this model cannot follow is refused now

    # ------------------------------------------------------------------------------------------- the model

    def use_model(self, model: Any) -> None:
        """Talk to ``model`` from now on (the conversation so far is kept): after a merge, an unload, a new
        inject or load replaced the model in its variable."""
        model = require_module(model)
        task = training_task(model)
        if task not in MEDIA_TASKS:
            task = detect_task(model).task_type
        if task not in (*_GENERATION_TASKS, *_CLASSIFY_TASKS, "ASR"):
            advice = encoder_advice(model)
            if advice is not None:
                raise UsageError(
                    f"`chat` cannot talk to this model: it neither generates, classifies nor transcribes. {advice}."
                )
            raise UsageError(
                "`chat` generates with causal or seq2seq LMs, shows the class probabilities of text, image and audio "
                f"classifiers and transcribes speech; this model ({type(base_model_of(model)).__name__}) is for "
                f"{task or 'an unknown task'}."
            )
        if self.task is not None and task != self.task and (task in MEDIA_TASKS or self.task in MEDIA_TASKS):
            # the processor and the view were chosen for the other task
            raise UsageError(
                f"This chat is for task {self.task} and the new model ({type(base_model_of(model)).__name__}) is for "
                f"{task or 'an unknown task'}: start a new chat with it (%lora chat MODEL)."
            )
        # a stale wrapper, or LoRA layers without a PeftModel around them: refused here, with the reason
        wrapper_for(model)
        self.model = model
        self.task = task

    @property
    def kind(self) -> str:
        """``generation``, ``classification`` (text, image or audio classifiers) or ``transcription`` (speech
        recognition)."""
        if self.task in _CLASSIFY_TASKS:
            return "classification"
        return "transcription" if self.task == "ASR" else "generation"

    @property
    def media(self) -> str | None:
        """What the model reads instead of text: ``image`` or ``audio`` (None: text)."""
        return _MEDIA.get(self.task)

    def _peft(self) -> nn.Module | None:
        """The PeftModel to run when the model holds an adapter, else None (checked again at each use: adapters
        can be deleted, and a wrapper can go stale, between messages)."""
        peft_model = wrapper_for(self.model)
        return peft_model if peft_model is not None and getattr(peft_model, "peft_config", None) else None

    @property
    def adapter_name(self) -> str | None:
        """The name of the active adapter (None: the model holds none)."""
        peft_model = self._peft()
        return active_names(peft_model)[0] if peft_model is not None else None

    @property
    def sides(self) -> tuple[str, ...]:
        """Which sides answer, from the ``adapter`` setting: ("adapter",), ("base",) or both. A model without an
        adapter answers as itself ("base"); side by side needs an adapter."""
        return self._sides()

    def _sides(self) -> tuple[str, ...]:
        mode = self.settings["adapter"]
        if self._peft() is None:
            if mode == "side_by_side":
                raise UsageError(
                    "`adapter`='side_by_side' compares the adapter with the base model, but this model has no LoRA "
                    "adapter. Inject or load one first, or chat with adapter='on'."
                )
            return ("base",)
        return {"on": ("adapter",), "off": ("base",), "side_by_side": SIDES}[mode]

    # ------------------------------------------------------------------------------------------- settings

    def configure(self, **settings: Any) -> None:
        """Change chat settings (validated; nothing changes when one is wrong)."""
        given = validate(settings, "chat")
        before = dict(self.settings)
        self.settings.update(given)
        try:
            self._sides()
        except UsageError:
            self.settings = before
            raise

    @property
    def templated(self) -> bool:
        """Whether the tokenizer formats the conversation with a chat template."""
        if self.processor is not None and getattr(self.processor, "chat_template", None):
            return self.kind == "generation"
        return self.kind == "generation" and has_chat_template(self.tokenizer)

    @property
    def note(self) -> str | None:
        """What to know about how messages are formatted (None: nothing unusual)."""
        return _PLAIN_NOTE if self.kind == "generation" and not self.templated else None

    # ------------------------------------------------------------------------------------------- prompts

    def messages(
        self, side: str = "adapter", text: str | None = None, first_turn: int = 0, images: tuple = ()
    ) -> list[dict]:
        """The conversation as ``side`` sees it (from turn ``first_turn``), as chat-template messages, with
        ``text`` (and ``images``) as the next user message."""
        system = self.settings["system"]
        out = [{"role": "system", "content": system}] if system else []
        for turn in self.turns[first_turn:]:
            reply = turn.replies.get(side)
            if reply is None:  # answered by the other side only (adapter mode changed): its reply
                reply = next(iter(turn.replies.values()), "")
            out += [self._user(turn.user, turn.images), {"role": "assistant", "content": reply}]
        if text is not None:
            out.append(self._user(text, images))
        return out

    def _user(self, text: str, images: tuple = ()) -> dict:
        """A user message; with images, in transformers' parts format (the images first, then the text). A
        conversation with images anywhere gives every message as parts, as processors' templates expect."""
        if self.processor is None:
            return {"role": "user", "content": text}
        parts = [{"type": "image", "image": image} for image in images]
        return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}

    def prompt(self, text: str, side: str = "adapter", images: Any = None) -> str:
        """The text the model is given for the next message ``text`` (chat template applied, turns that do not
        fit the context left out)."""
        text = self._check_message(text)
        return self._prompt(side, text, self._images(images))[0]

    def _images(self, images: Any) -> tuple:
        """The images of a message, decoded (a UsageError names the one that cannot be read)."""
        if images is None:
            return ()
        from .data.vision_chat import load_image

        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if images and (self.processor is None or image_processor(self.processor) is None):
            raise UsageError(
                "A message with images needs the model's processor (with an image processor); this conversation "
                f"has {'the processor ' + type(self.processor).__name__ if self.processor else 'a tokenizer only'}. "
                "Pass processor=AutoProcessor.from_pretrained(<the model's name or folder>)."
            )
        out = []
        for k, image in enumerate(images):
            try:
                out.append(load_image(image))
            except Exception as exc:  # any reader's failure: which image and why
                raise UsageError(
                    f"`images[{k}]` cannot be read: {type(exc).__name__}: {str(exc)[:160]}."
                ) from None
        return tuple(out)

    def _prompt(self, side: str, text: str, images: tuple = ()) -> tuple[str, dict[str, torch.Tensor]]:
        """The prompt text and its model inputs. With a chat template, the oldest turns are left out until the
        prompt leaves ``max_new_tokens`` of the model's context for the reply."""
        limit = _context_limit(self.model)
        room = None if limit is None else limit - self.settings["max_new_tokens"]
        tok = self.processor if self.processor is not None and self.templated else self.tokenizer
        if images and not self.templated:
            raise UsageError(
                "A message with images needs a chat template that places them: set processor.chat_template."
            )
        if self.templated:
            for start in range(len(self.turns) + 1):
                messages = self.messages(side, text, start, images)
                inputs = tok.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
                if room is None or inputs["input_ids"].shape[1] <= room:
                    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    return rendered, self._tensors(inputs)
        else:
            inputs = self.tokenizer(text, return_tensors="pt")
            if room is None or inputs["input_ids"].shape[1] <= room:
                return text, self._tensors(inputs)
        raise UsageError(
            f"The message takes {inputs['input_ids'].shape[1]} tokens and `max_new_tokens`="
            f"{self.settings['max_new_tokens']} more: past this model's context of {limit} tokens. Shorten the "
            "message or lower max_new_tokens."
        )

    def _tensors(self, encoded: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        keep = ("input_ids", "attention_mask")
        if self.processor is not None:  # pixels and the rest, as far as the model's forward takes them
            from .data.vision_chat import forward_inputs

            keep = forward_inputs(self.model)
        inputs = {k: v for k, v in encoded.items() if k in keep and isinstance(v, torch.Tensor)}
        vocab = vocab_size_of(self.model)
        if vocab is not None:
            check_token_ids([{"input_ids": inputs["input_ids"][0].tolist()}], self.tokenizer, vocab, False)
        device = input_device(self.model)
        return {k: v.to(device) for k, v in inputs.items()}

    @staticmethod
    def _check_message(text: Any) -> str:
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"The message must be non-empty text, got {text!r}.")
        return text

    # ------------------------------------------------------------------------------------------- generation

    def check_not_training(self) -> None:
        """Raise a UsageError when a background run is training the model (it must not run meanwhile)."""
        check_not_training(
            self.model,
            {"classification": "classify", "transcription": "transcribe"}.get(self.kind, "generate"),
        )

    def _check_ready(self) -> None:
        if self.kind != "generation":
            raise UsageError(self._wrong_call("send"))
        check_not_training(self.model, "generate")
        if self._reply is not None and not self._reply.done:
            raise UsageError(
                "A reply is being generated: wait for it, or stop it (the Stop button, or reply.stop()), before "
                "sending the next message."
            )

    def _prepare(
        self, text: Any, images: Any = None
    ) -> tuple[str, tuple[str, ...], dict[str, dict], int, tuple]:
        text = self._check_message(text)
        self._check_ready()
        images = self._images(images)
        sides = self.sides
        inputs = {side: self._prompt(side, text, images)[1] for side in sides}
        return text, sides, inputs, self.settings["seed"] + len(self.turns), images

    def _generate(
        self, side: str, inputs: dict, seed: int, streamer: Any = None, stop: Any = None
    ) -> torch.Tensor:
        """``generate`` for one side: the adapter on, or off inside PEFT's ``disable_adapter()``; eval mode (the
        train/eval flags are put back), sampling from ``seed``."""
        s = self.settings
        kwargs: dict[str, Any] = dict(
            inputs, max_new_tokens=s["max_new_tokens"], pad_token_id=pad_token_id(self.tokenizer)
        )
        if s["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"])
        else:  # greedy: the model's own sampling defaults (generation_config) play no part
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnEvent(stop)])
        peft_model = self._peft()
        model = peft_model if peft_model is not None else self.model
        off = side == "base" and peft_model is not None
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with (
                model.disable_adapter() if off else contextlib.nullcontext(),
                _seeded(seed, input_device(model)),
                torch.no_grad(),
            ):
                return model.generate(**kwargs)
        finally:
            for module, mode in modes:
                module.training = mode

    def _decode(self, out: torch.Tensor, inputs: dict) -> str:
        seq2seq = getattr(base_model_of(self.model).config, "is_encoder_decoder", False)
        new = out[0] if seq2seq else out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def send(self, text: str, images: Any = None) -> Turn:
        """Generate the reply to ``text`` (with ``images``, for a vision-language model) of each side, in this
        thread, without streaming; the turn is kept."""
        text, sides, inputs, seed, images = self._prepare(text, images)
        replies = {
            side: self._decode(self._generate(side, inputs[side], seed), inputs[side]) for side in sides
        }
        turn = Turn(text, replies, seed=seed, images=images)
        self.turns.append(turn)
        return turn

    def start(
        self,
        text: str,
        on_text: Callable[[str, str], Any] | None = None,
        on_done: Callable[[Reply], Any] | None = None,
        images: Any = None,
    ) -> Reply:
        """Start generating the reply to ``text`` on a background thread and return its ``Reply`` at once.
        ``on_text(side, text_so_far)`` is called (on that thread) as text arrives, ``on_done(reply)`` once it is
        over (before ``wait`` returns). Mistakes (empty message, too long for the context, a model in training)
        are raised here, before anything starts."""
        with self._lock:
            text, sides, inputs, seed, images = self._prepare(text, images)
            reply = Reply(self, text, sides, inputs, seed, on_text, on_done)
            reply.images = images
            self._reply = reply
        return reply._begin()

    def stream(self, text: str, images: Any = None) -> Iterator[tuple[str, str]]:
        """Yield ``(side, piece)`` as the reply to ``text`` is generated (sides one after the other); the turn is
        kept at the end. Leaving the loop early stops generation."""
        reply = self.start(text, images=images)
        try:
            yield from reply.pieces()
        finally:
            if not reply.done:
                reply.stop()
        if reply.error is not None:
            raise reply.error

    @property
    def reply(self) -> Reply | None:
        """The latest reply started with ``start`` (running or finished)."""
        return self._reply

    def _record(self, turn: Turn) -> None:
        self.turns.append(turn)

    def clear(self) -> None:
        """Forget the conversation (a reply being generated is stopped first)."""
        if self._reply is not None and not self._reply.done:
            self._reply.stop()
        self.turns.clear()

    # ------------------------------------------------------------------------------------------- classifiers

    def classify(self, x: Any) -> Classification:
        """The class probabilities of ``x``, with the adapter and without it when the model holds one: text for a
        sequence classifier; for an image or audio classifier one image or clip in any form a training record's
        column takes (PIL image, array, tensor, file path, bytes, datasets ``Image``/``Audio`` dict, or a whole
        record), made into inputs by the processor as training batches are."""
        if self.media is None:
            x = self._check_message(x)
        check_not_training(self.model, "classify")
        if self.kind != "classification":
            raise UsageError(self._wrong_call("classify"))
        if self.media is None:
            limit = _context_limit(self.model)
            encoded = self.tokenizer(x, return_tensors="pt", truncation=limit is not None, max_length=limit)
            inputs, described = self._tensors(encoded), x
        else:
            inputs, described = self._media_inputs(x)
        probs = self._both_sides(lambda model: class_probabilities(model, inputs))
        n = next(iter(probs.values())).shape[0]
        return Classification(
            text=described,
            labels=class_labels(self._peft() or self.model, n),
            probs={side: tuple(float(p) for p in values) for side, values in probs.items()},
            adapter_name=self.adapter_name,
        )

    def transcribe(self, x: Any) -> Transcription:
        """The transcript of one clip (in any form a training record's audio column takes, or a whole record) by a
        speech recognition model, with the adapter and without it when the model holds one: greedy, at most the
        ``max_new_tokens`` setting's tokens (a CTC model: the most likely token per frame)."""
        check_not_training(self.model, "transcribe")
        if self.kind != "transcription":
            raise UsageError(self._wrong_call("transcribe"))
        inputs, described = self._media_inputs(x)
        limit = self.settings["max_new_tokens"]
        texts = self._both_sides(lambda model: transcript(model, self.tokenizer, inputs, limit))
        return Transcription(input=described, texts=texts, adapter_name=self.adapter_name)

    def _media_inputs(self, x: Any) -> tuple[dict[str, torch.Tensor], str]:
        """One image or clip as the model's inputs (on its device) and what it was, made as training makes them."""
        from .data.media import media_inputs

        if isinstance(x, str) and not os.path.exists(x) and (not os.path.splitext(x)[1] or "\n" in x):
            # not a file name: text given to a model that reads images or audio
            raise UsageError(
                f"This model ({type(base_model_of(self.model)).__name__}) reads {_READS[self.media]}, not text: "
                f"give {_GIVE[self.media]}; got {x[:60]!r}."
            )
        inputs, described = media_inputs(
            x, self.processor, self.task, what="input", model=base_model_of(self.model)
        )
        device = input_device(self.model)
        return {k: v.to(device) for k, v in inputs.items()}, described

    def _both_sides(self, run: Callable[[nn.Module], Any]) -> dict[str, Any]:
        """``run(model)`` with the adapter (when the model holds one) and without it (PEFT's ``disable_adapter()``),
        in eval mode, without gradients; the train/eval flags are put back."""
        peft_model = self._peft()
        model = peft_model if peft_model is not None else self.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                if peft_model is None:
                    return {"base": run(model)}
                out = {"adapter": run(model)}
                with model.disable_adapter():
                    out["base"] = run(model)
                return out
        finally:
            for module, mode in modes:
                module.training = mode

    def _wrong_call(self, call: str) -> str:
        """The one-line message for ``call`` (send, classify, transcribe) on a model that does something else."""
        name = type(base_model_of(self.model)).__name__
        if self.kind == "classification" and self.media is None:
            return (
                "This model is a sequence classifier: it gives class probabilities, not replies. Use classify(text) "
                "(the chat widget shows them)."
            )
        if self.kind == "classification":
            return (
                f"This model ({name}) classifies {_READS[self.media]}: it gives class probabilities, not "
                f"{'replies' if call == 'send' else 'transcripts'}. Use classify({self.media}) (the chat widget shows "
                "them)."
            )
        if self.kind == "transcription":
            return (
                f"This model ({name}) recognises speech: it gives the transcript of a clip, not "
                f"{'replies' if call == 'send' else 'class probabilities'}. Use transcribe(audio) (the chat widget "
                "shows it)."
            )
        what = "speech recognition" if call == "transcribe" else "classifiers"
        return f"`{call}` is for {what}; this model generates: send it a message."

    def __repr__(self) -> str:
        what = {"classification": "classifier", "transcription": "speech recognition"}.get(
            self.kind, f"{len(self.turns)} turns"
        )
        return f"<jupyter_lora.Conversation: {what}, adapter {self.settings['adapter']}>"


class Reply:
    """One reply being generated on a background thread (``Conversation.start``). ``texts[side]``: the text so
    far; ``side``: the side generating now; ``stop()``, ``wait()``, ``done``; ``turn`` once it is over (kept in
    the conversation unless generation failed: then ``error`` holds the exception)."""

    def __init__(self, conversation: Conversation, user: str, sides: tuple[str, ...], inputs: dict[str, dict],
                 seed: int, on_text: Callable[[str, str], Any] | None = None,
                 on_done: Callable[[Reply], Any] | None = None):  # fmt: skip
        self.conversation = conversation
        self.user = user
        self.sides = sides
        self.inputs = inputs
        self.seed = seed
        self.on_text = on_text
        self.on_done = on_done
        self.texts: dict[str, str] = {side: "" for side in sides}
        self.images: tuple = ()  # the message's images (``Conversation.start`` sets them)
        self.side: str | None = None
        self.stopped = False
        self.error: BaseException | None = None
        self.turn: Turn | None = None
        self._started: list[str] = []
        self._stop = threading.Event()
        self._done = threading.Event()
        self._pieces: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="jupyter_lora chat", daemon=True)

    def _begin(self) -> Reply:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        """Whether generation is over (finished, stopped or failed)."""
        return self._done.is_set()

    def stop(self, wait: bool = True, timeout: float | None = 30.0) -> Reply:
        """End generation at the next token; the text so far stays (and the turn is kept)."""
        self._stop.set()
        if wait:
            self.wait(timeout)
        return self

    def wait(self, timeout: float | None = None) -> Reply:
        """Block until generation is over and its thread has ended (or ``timeout`` seconds pass)."""
        if self._done.wait(timeout) and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return self

    def pieces(self) -> Iterator[tuple[str, str]]:
        """``(side, piece)`` in the order they were generated, until the reply is over."""
        while (item := self._pieces.get()) is not None:
            yield item

    def _run(self) -> None:
        try:
            for side in self.sides:
                if self._stop.is_set():
                    break
                self.side = side
                self._started.append(side)
                self._stream(side)
        except BaseException as exc:  # kept on the reply (the widget shows it), never lost on the thread
            self.error = exc
        finally:
            self.stopped = self._stop.is_set()
            self.turn = Turn(self.user, {s: self.texts[s] for s in self._started}, self.stopped, self.seed,
                             self.images)  # fmt: skip
            if self.error is None:
                self.conversation._record(self.turn)
            self.side = None
            try:
                if self.on_done is not None:
                    self.on_done(self)
            except BaseException as exc:  # the reply itself is complete; keep the first failure
                self.error = self.error or exc
            finally:
                self._done.set()
                self._pieces.put(None)

    def _stream(self, side: str) -> None:
        """Generate one side on a worker thread and read its text from a ``TextIteratorStreamer`` here."""
        streamer = TextIteratorStreamer(
            self.conversation.tokenizer, skip_prompt=True, skip_special_tokens=True
        )
        failed: list[BaseException] = []

        def work() -> None:
            try:
                self.conversation._generate(side, self.inputs[side], self.seed, streamer, self._stop)
            except BaseException as exc:  # raised below; the streamer must end for the reading loop to end
                failed.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name=f"jupyter_lora chat ({side})", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    self.texts[side] += piece
                    self._pieces.put((side, piece))
                    if self.on_text is not None:
                        self.on_text(side, self.texts[side])
        except BaseException:  # on_text failed: end generation before leaving
            self._stop.set()
            for _ in streamer:
                pass
            raise
        finally:
            worker.join()
        if failed:
            raise failed[0]

    def __repr__(self) -> str:
        state = (
            "running" if not self.done else "failed" if self.error else "stopped" if self.stopped else "done"
        )
        return f"<jupyter_lora chat Reply ({state}): {self.texts!r}>"
