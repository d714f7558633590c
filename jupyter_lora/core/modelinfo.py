"""Facts about a model that the other core modules need: its base under a PEFT wrapper, its task, its heads,
its tied weights, and honest parameter counts (PEFT's way: shared tensors once, packed 4-bit weights unpacked).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..settings import TASK_TYPES, normalize_task_type
from .errors import UsageError

__all__ = [
    "ADAPTER_PARAM",
    "TASK_TYPES",
    "TaskInfo",
    "base_model_of",
    "detect_task",
    "embedding_layers",
    "encoder_advice",
    "fingerprint",
    "is_peft_model",
    "normalize_task_type",
    "param_count",
    "require_module",
    "tied_duplicates",
    "wrapper_fits",
]

# Parameter names PEFT gives adapter weights: `<path>.lora_A.<adapter>.weight`, `<path>.modules_to_save.<adapter>.w`
ADAPTER_PARAM = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\.([^.]+)(\.|$)"
)

# Task types whose head is created fresh on top of a pretrained backbone, so it must be trained and saved.
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "IMAGE_CLS", "AUDIO_CLS", "CTC"}

# Parameters of PEFT's task wrappers' forward that switch what is returned rather than carry an input.
_WRAPPER_SWITCHES = {
    "self",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "task_ids",
    "args",
    "kwargs",
}


def require_module(model: Any, what: str = "model") -> nn.Module:
    """Return ``model`` if it is a torch module, else raise a ``UsageError`` saying what it is."""
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"`{what}` must be a torch.nn.Module (a transformers or PEFT model), got {type(model).__name__}"
            f" ({_short_repr(model)}). Pass the model object itself, e.g. the result of "
            "AutoModelForCausalLM.from_pretrained(...)."
        )
    return model


def _short_repr(obj: Any, limit: int = 40) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it was never imported)."""
    peft_model = sys.modules.get("peft.peft_model")
    return peft_model is not None and isinstance(model, peft_model.PeftModel)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or the model itself. PEFT's own ``get_base_model``: for
    prompt and prefix tuning the model sits directly under the wrapper (no tuner in between)."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


@dataclass(frozen=True)
class TaskInfo:
    """What a model is for, as PEFT's ``task_type`` sees it, and which modules are its task head.

    ``task_type`` is the PEFT task type ``inject`` wraps the model with: the model's own task (``kind``) when
    PEFT's wrapper for it can pass the model its inputs, else None (the plain ``PeftModel``, which passes every
    input through as given) — e.g. Whisper is a seq2seq LM whose forward reads ``input_features``, not the
    ``input_ids`` PEFT's seq2seq wrapper hands on. ``kind`` is what the model is for, also for tasks PEFT has no
    wrapper for (IMAGE_CLS, AUDIO_CLS, CTC); ``main_input`` the name of the model's main input.

    ``heads`` are module paths (relative to the base model) that sit on top of the pretrained backbone and
    are created fresh for the task (a classifier, a QA span head, a CTC head). They are trained fully
    (``modules_to_save``) and never receive LoRA from a preset. ``output_embeddings`` is the LM head path
    (excluded from presets too).
    """

    task_type: str | None
    heads: tuple[str, ...]
    output_embeddings: str | None
    kind: str | None = None
    main_input: str = "input_ids"


def _class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, mapping_name, {})
    names: set[str] = set()
    for value in mapping.values():
        if isinstance(value, (tuple, list)):
            names.update(value)
        else:
            names.add(value)
    return names


def _task_from_class(model: nn.Module) -> str | None:
    name = type(model).__name__
    table = (
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
        ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
        ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
        ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
        ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
        ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "IMAGE_CLS"),
        ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
        ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AUDIO_CLS"),
        ("MODEL_FOR_CTC_MAPPING_NAMES", "CTC"),
        ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
    )
    for mapping_name, task in table:
        if name in _class_names(mapping_name):
            return task
    # Classes outside the auto mappings (custom heads): go by the naming convention transformers uses.
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForImageClassification", "IMAGE_CLS"),
        ("ForAudioClassification", "AUDIO_CLS"),
        ("ForCTC", "CTC"),
    ):
        if name.endswith(suffix):
            if task == "SEQ_2_SEQ_LM" and not getattr(
                getattr(model, "config", None), "is_encoder_decoder", False
            ):
                return "CAUSAL_LM"
            return task
    return None


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def detect_task(model: nn.Module) -> TaskInfo:
    """The PEFT task type and head modules of a (base) model, from its class, structure and forward signature."""
    model = base_model_of(model)
    task = _task_from_class(model)
    output_embeddings = None
    _, out_layer = embedding_layers(model)
    if out_layer is not None:
        output_embeddings = _module_path(model, out_layer)
    heads: tuple[str, ...] = ()
    if task in _HEAD_TASKS:
        heads = _fresh_heads(model, output_embeddings)
    peft_task = task if wrapper_fits(model, task) else None
    main_input = getattr(model, "main_input_name", None) or "input_ids"
    return TaskInfo(
        task_type=peft_task,
        heads=heads,
        output_embeddings=output_embeddings,
        kind=task,
        main_input=main_input,
    )


def encoder_advice(model: nn.Module) -> str | None:
    """For an image encoder without a task head — a contrastive image-text dual encoder (CLIP, SigLIP) or its
    vision tower (CLIPVisionModel), ViTModel — what it is and what works with it, as a sentence for the messages
    that refuse to train or chat with it; None for every other model."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    if detect_task(base).kind not in (None, "FEATURE_EXTRACTION"):
        return None
    vision = getattr(config, "vision_config", None)
    dual = vision is not None and getattr(config, "text_config", None) is not None
    if not dual and getattr(base, "main_input_name", None) != "pixel_values":
        return None
    name = type(base).__name__
    what = (
        f"{name} is a contrastive image-text dual encoder: contrastive (image-text) training is not supported here"
        if dual
        else f"{name} is an image encoder without a task head: it has nothing to train against here"
    )
    head = (
        _image_classifier_for(getattr(config, "model_type", None) or "") or "AutoModelForImageClassification"
    )
    return (
        f"{what}. With it you can inject, save and load, and merge adapters; to train, load the same checkpoint "
        f"with an image classifier head ({head}.from_pretrained(..., num_labels=N)) and train it on labelled "
        "images (task: image_cls)"
    )


def _image_classifier_for(model_type: str) -> str | None:
    """transformers' image-classification class for ``model_type`` (or the model its vision tower belongs to:
    ``clip_vision_model`` -> CLIPForImageClassification), None when it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as mapping

    for candidate in (
        model_type,
        model_type.removesuffix("_vision_model"),
        model_type.removesuffix("_vision"),
    ):
        found = mapping.get(candidate)
        if found:
            return found if isinstance(found, str) else found[0]
    return None


def embedding_layers(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embeddings, output embeddings) of a transformers model, None for each it has not: these methods
    are optional (wav2vec2, ViT and CLIP raise NotImplementedError or have no such layer)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            layer = fn() if callable(fn) else None
        except (AttributeError, NotImplementedError):
            layer = None
        layers.append(layer if isinstance(layer, nn.Module) else None)
    return layers[0], layers[1]


@functools.lru_cache(maxsize=256)
def _wrapper_inputs(task_type: str) -> tuple[str, ...] | None:
    """The inputs PEFT's wrapper for ``task_type`` passes the model by name (its forward's parameters, less the
    output switches), the first one its positional input; None when PEFT has no wrapper for the task."""
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
    if wrapper is None:
        return None
    return tuple(p for p in inspect.signature(wrapper.forward).parameters if p not in _WRAPPER_SWITCHES)


@functools.lru_cache(maxsize=256)
def _forward_parameters(cls: type) -> frozenset[str] | None:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None


def wrapper_fits(model: nn.Module, task_type: str | None) -> bool:
    """Whether PEFT's wrapper for ``task_type`` can run ``model``: its forward passes the model ``input_ids``,
    ``inputs_embeds``, ``labels`` ... by name (None when not given) and takes a positional first input as
    ``input_ids``, so the model's forward must name each of them and read ``input_ids`` as its main input. A
    model that reads ``pixel_values``, ``input_features`` or ``input_values`` (or whose forward leaves one of those
    names to ``**kwargs``, where it reaches a sub-module twice) is wrapped in the plain ``PeftModel`` instead."""
    if task_type is None:
        return True
    model = base_model_of(model)
    inputs = _wrapper_inputs(task_type)
    params = _forward_parameters(type(model))
    if inputs is None or params is None:
        return False
    main = getattr(model, "main_input_name", None) or "input_ids"
    return main == inputs[0] and set(inputs) <= params


def _fresh_heads(model: nn.Module, output_embeddings: str | None) -> tuple[str, ...]:
    """Top-level children beside the pretrained backbone that hold parameters: the task head(s).

    transformers names the backbone attribute ``base_model_prefix`` (``bert``, ``model``, ``transformer``...);
    everything else with weights at the top level (``classifier``, ``score``, ``pre_classifier``, ``qa_outputs``)
    is created for the task and not in a base checkpoint — unless it holds a stack of layers: a backbone under
    another name (``WhisperForAudioClassification.encoder``) is pretrained, not a head.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    heads = []
    for name, child in model.named_children():
        if name in (prefix, output_embeddings):
            continue
        if any(isinstance(m, nn.ModuleList) for m in child.modules()):
            continue
        if any(True for _ in child.parameters()):
            heads.append(name)
    return tuple(heads)


def tied_duplicates(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` parameter names that transformers ties but that are separate tensors right now.

    On the meta device (``init_empty_weights``) tying may not have happened, so a naive count counts e.g.
    GPT-2's ``lm_head.weight`` twice; once the weights are loaded they share one tensor.
    """
    model = base_model_of(model)
    mapping = getattr(model, "all_tied_weights_keys", None)
    if mapping is None:
        expand = getattr(model, "get_expanded_tied_weights_keys", None)
        try:
            mapping = expand(all_submodels=True) if callable(expand) else None
        except Exception:  # an exotic model whose tying rules cannot be expanded: count as is
            mapping = None
    if not mapping:
        return {}
    params = dict(model.named_parameters(remove_duplicate=False))
    duplicates = {}
    for target, source in mapping.items():
        t, s = params.get(target), params.get(source)
        if t is not None and s is not None and t is not s:
            duplicates[target] = source
    return duplicates


def param_count(param: torch.Tensor) -> int:
    """Number of parameters a tensor stands for; bitsandbytes 4-bit weights pack two (or more) per element."""
    n = param.numel()
    if n == 0 and hasattr(param, "ds_numel"):
        return int(param.ds_numel)
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # a 4-bit weight exists only once bitsandbytes is imported
    if bnb_nn is not None and isinstance(param, bnb_nn.Params4bit):
        quant_storage = getattr(param, "quant_storage", None)
        itemsize = quant_storage.itemsize if quant_storage is not None else param.element_size()
        n = n * 2 * itemsize
    return n


def fingerprint(model: nn.Module) -> int:
    """A number that changes when the structure of ``model`` changes: its modules (paths and classes), its
    parameters (names, shapes, dtypes) or, for a PeftModel, its adapters. Weights and training do not change it."""
    modules = tuple((path, type(m).__qualname__) for path, m in model.named_modules())
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in model.named_parameters())
    adapters = tuple(getattr(model, "peft_config", None) or ())
    return hash((modules, params, adapters))
