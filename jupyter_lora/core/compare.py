"""Base vs adapter, side by side: the same prompt through the model with its adapter and, inside PEFT's
``disable_adapter()`` context, without it. Generation for causal and seq2seq LMs, class probabilities for
sequence classifiers; for image and audio models the "prompt" is one image or audio clip (in any shape a training
record takes), giving class probabilities, or a transcript for speech recognition.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.guards import require_adapters
from .adapters.peft_facts import active_names
from .errors import UsageError
from .modelinfo import detect_task, require_module

__all__ = ["Comparison", "class_labels", "class_probabilities", "compare", "input_device", "transcript"]


@dataclass(frozen=True)
class Comparison:
    """The outputs of the base model and of the adapted model for one prompt."""

    prompt: str
    kind: str  # generation | classification
    base: str
    adapter: str
    adapter_name: str
    labels: tuple[str, ...] = ()
    base_probs: tuple[float, ...] = ()
    adapter_probs: tuple[float, ...] = ()

    def __repr__(self) -> str:
        return f"Comparison({self.kind} for {self.prompt!r}: base {self.base!r}, adapter {self.adapter_name!r} {self.adapter!r})"


# What a model's main input holds, for the message of a model that does not read text.
_MEDIA = {
    "pixel_values": "images",
    "input_features": "audio features",
    "input_values": "audio samples",
    "flattened_patches": "image patches",
}


def input_device(model: nn.Module) -> torch.device:
    """Where ``model`` takes its inputs: the device of its first parameter (the CPU when it has none)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def compare(
    model: nn.Module,
    prompt: Any,
    tokenizer: Any = None,
    max_new_tokens: int = 40,
    *,
    images: Any = None,
    processor: Any = None,
) -> Comparison:
    """Run ``prompt`` through ``model`` with and without its active adapter (greedy decoding).

    Image and audio models take an image or a clip instead of text: a PIL image, an array or tensor, a file path,
    a datasets ``Audio`` dict ``{"array", "sampling_rate"}``, or a whole training record (``{"image": ...}``,
    ``{"audio": ..., "sampling_rate": ...}``), turned into inputs by ``processor`` (default: the one saved beside
    the model) exactly as training batches are. ``images``: for a vision-language model, images shown with the
    prompt, as one user message rendered by its ``processor``'s chat template (a processor may also come as
    ``tokenizer``)."""
    require_module(model)
    peft_model = require_adapters(model, "compare")
    from .data.processors import MEDIA_TASKS, is_vision_language, training_task

    media_task = training_task(peft_model)
    if media_task in MEDIA_TASKS:
        return _compare_media(peft_model, prompt, tokenizer, processor, media_task, max_new_tokens)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"`prompt` must be non-empty text, got {prompt!r}.")
    if images is not None or (processor is not None and is_vision_language(peft_model)):
        return _compare_vision(peft_model, prompt, images, processor or tokenizer, max_new_tokens)
    if tokenizer is None or not callable(tokenizer):
        raise UsageError(
            "`tokenizer` is needed to turn the prompt into tokens: pass the model's tokenizer, e.g. "
            'compare(model, prompt, tokenizer=tok) or %lora compare model "..." --tokenizer tok.'
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise UsageError(f"`max_new_tokens` must be a positive whole number, got {max_new_tokens!r}.")
    task = detect_task(peft_model)
    if task.main_input != "input_ids":
        raise UsageError(
            f"`compare` runs a text prompt through the model; this {type(peft_model.base_model.model).__name__} "
            f"reads `{task.main_input}` ({_MEDIA.get(task.main_input, 'not text')}), not token ids. Run the model "
            "on its own inputs with the adapter and inside `with model.disable_adapter():` to compare."
        )
    name = active_names(peft_model)[0]
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {
        k: v.to(input_device(peft_model)) for k, v in inputs.items() if k in ("input_ids", "attention_mask")
    }
    modes = [(m, m.training) for m in peft_model.modules()]
    peft_model.eval()
    try:
        if task.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            return _compare_generation(
                peft_model, tokenizer, prompt, inputs, max_new_tokens, task.task_type, name
            )
        if task.task_type == "SEQ_CLS":
            return _compare_classification(peft_model, prompt, inputs, name)
    finally:
        for module, mode in modes:
            module.training = mode
    raise UsageError(
        f"`compare` shows generations (causal/seq2seq LMs) or class probabilities (sequence classifiers); this "
        f"model's task is {task.task_type or 'unknown'}."
    )


def _generate(model: nn.Module, tokenizer: Any, inputs: dict, max_new_tokens: int, seq2seq: bool) -> str:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0] if seq2seq else out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True)


def _compare_generation(model, tokenizer, prompt, inputs, max_new_tokens, task, name) -> Comparison:
    seq2seq = task == "SEQ_2_SEQ_LM"
    adapter = _generate(model, tokenizer, inputs, max_new_tokens, seq2seq)
    with model.disable_adapter():
        base = _generate(model, tokenizer, inputs, max_new_tokens, seq2seq)
    return Comparison(prompt=prompt, kind="generation", base=base, adapter=adapter, adapter_name=name)


def _compare_vision(peft_model: nn.Module, prompt: str, images: Any, processor: Any, max_new_tokens: int):
    """``compare`` with images: one user message (the images, then the prompt) rendered by the processor's chat
    template, greedy, adapter on and off."""
    from .data.processors import image_processor, text_tokenizer
    from .data.vision_chat import forward_inputs, load_image

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise UsageError(f"`max_new_tokens` must be a positive whole number, got {max_new_tokens!r}.")
    if image_processor(processor) is None or not getattr(processor, "chat_template", None):
        raise UsageError(
            "`compare` with images needs the model's processor, with an image processor and a chat template: pass "
            "processor=AutoProcessor.from_pretrained(<the model's name or folder>)."
        )
    parts = []
    for k, image in enumerate(
        images if isinstance(images, (list, tuple)) else [images] if images is not None else []
    ):
        try:
            parts.append({"type": "image", "image": load_image(image)})
        except Exception as exc:  # any reader's failure: which image and why
            raise UsageError(
                f"`images[{k}]` cannot be read: {type(exc).__name__}: {str(exc)[:160]}."
            ) from None
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
    encoded = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    keep = forward_inputs(peft_model)
    device = input_device(peft_model)
    inputs = {k: v.to(device) for k, v in encoded.items() if k in keep and isinstance(v, torch.Tensor)}
    modes = [(m, m.training) for m in peft_model.modules()]
    peft_model.eval()
    try:
        return _compare_generation(
            peft_model, text_tokenizer(processor), prompt, inputs, max_new_tokens, "CAUSAL_LM",
            active_names(peft_model)[0],
        )  # fmt: skip
    finally:
        for module, mode in modes:
            module.training = mode


def class_probabilities(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The softmax over the classes of a sequence classifier for the first row of ``inputs`` (fp32)."""
    with torch.no_grad():
        return model(**inputs).logits.float().softmax(-1)[0]


def class_labels(model: nn.Module, n: int) -> tuple[str, ...]:
    """The names of a classifier's ``n`` classes: ``config.id2label``, else ``LABEL_i``."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(n))


def _compare_classification(model, prompt, inputs, name) -> Comparison:
    adapter = class_probabilities(model, inputs)
    with model.disable_adapter():
        base = class_probabilities(model, inputs)
    labels = class_labels(model, adapter.shape[0])
    return Comparison(
        prompt=prompt,
        kind="classification",
        base=labels[int(base.argmax())],
        adapter=labels[int(adapter.argmax())],
        adapter_name=name,
        labels=labels,
        base_probs=tuple(float(x) for x in base),
        adapter_probs=tuple(float(x) for x in adapter),
    )


def _compare_media(model, value, tokenizer, processor, task, max_new_tokens) -> Comparison:
    from .data.media import media_inputs
    from .data.processors import pick_preprocessor, text_tokenizer

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise UsageError(f"`max_new_tokens` must be a positive whole number, got {max_new_tokens!r}.")
    processor = pick_preprocessor(model, task, tokenizer, processor)
    from .modelinfo import base_model_of

    inputs, described = media_inputs(value, processor, task, what="prompt", model=base_model_of(model))
    inputs = {k: v.to(input_device(model)) for k, v in inputs.items()}
    name = active_names(model)[0]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if task == "ASR":
            tok = text_tokenizer(processor)
            adapter = transcript(model, tok, inputs, max_new_tokens)
            with model.disable_adapter():
                base = transcript(model, tok, inputs, max_new_tokens)
            return Comparison(
                prompt=described, kind="generation", base=base, adapter=adapter, adapter_name=name
            )
        return _compare_classification(model, described, inputs, name)
    finally:
        for module, mode in modes:
            module.training = mode


def transcript(model: nn.Module, tokenizer: Any, inputs: dict, max_new_tokens: int) -> str:
    """The transcript of one clip: the model's ``generate`` (an encoder-decoder like Whisper, greedy), or for a
    CTC model the most likely token per frame, which the CTC tokenizer's decode collapses."""
    config = getattr(model, "config", None)
    with torch.no_grad():
        if getattr(config, "is_encoder_decoder", False):
            # the decoder's positions bound the reply (Whisper refuses more; its start tokens take up to 4)
            limit = getattr(config, "max_target_positions", None)
            if isinstance(limit, int) and limit > 4:
                max_new_tokens = min(max_new_tokens, limit - 4)
            with _whisper_notice_dropped(model):
                ids = model.generate(**inputs, **_generation_kwargs(model, max_new_tokens))[0]
        else:
            ids = model(**inputs).logits.argmax(-1)[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


class _WhisperOwnNotice(logging.Filter):
    """Drops the one notice transformers' Whisper ``generate`` logs about its own call: it hands its inner
    ``generate`` both a ``generation_config`` and ``suppress_tokens`` / ``begin_suppress_tokens`` whatever the
    caller passes, so no argument here avoids it. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Passing `generation_config` together with") and "suppress_tokens" in message
        )


def _generation_kwargs(model: nn.Module, max_new_tokens: int) -> dict[str, Any]:
    """``generate``'s arguments for a greedy transcript of at most ``max_new_tokens`` tokens, in the form the model's
    own ``generate`` reads without complaint: a ``GenerationConfig`` (the model's, with the length and greedy
    decoding set). Whisper's ``generate`` prepares the config twice, so ``max_new_tokens`` there meets the default
    ``max_length`` it filled in itself; its own ``max_length`` means tokens after the start tokens, which is what
    is given to it."""
    from transformers import GenerationConfig

    from .modelinfo import base_model_of

    base = base_model_of(model)
    own = getattr(base, "generation_config", None)
    config = GenerationConfig.from_dict(own.to_dict()) if own is not None else GenerationConfig()
    config.do_sample = False
    if hasattr(base, "generate_with_fallback"):  # Whisper's generate
        config.max_length, config.max_new_tokens = max_new_tokens, None
    else:
        config.max_new_tokens = max_new_tokens
    return {"generation_config": config}


@contextlib.contextmanager
def _whisper_notice_dropped(model: nn.Module):
    """While Whisper generates: ``_WhisperOwnNotice`` on transformers' generation logger (nothing else is
    filtered, and nothing for other models)."""
    from .modelinfo import base_model_of

    if not hasattr(base_model_of(model), "generate_with_fallback"):
        yield
        return
    logger, notice = logging.getLogger("transformers.generation.utils"), _WhisperOwnNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
