"""Every setting once: name, type, default, allowed values or range, aliases and one line of help, declared as
dataclass fields with metadata (as PEFT's ``LoraConfig`` carries its help). Importable without torch.

Everything else derives from these declarations: the ``%%lora`` YAML keys and aliases, ``%lora help``, the
``LoraMagics`` defaults (``%config LoraMagics.default_r = 8``), the panel's controls, the defaults of ``plan`` /
``estimate`` / ``train`` / ``export``, and validation (``validate``). Adding a setting is one field here plus its
behaviour where it is used.

Each setting has *scopes*, the commands that take it:

- ``inject``   what to inject (``%%lora MODEL``, ``jl.plan`` / ``jl.inject``)
- ``train``    how to train (``%%lora train``, ``jl.train``, ``jl.resume``, ``jl.export``)
- ``estimate`` what a memory estimate assumes (``%lora estimate``, the summary after ``%%lora``, the panel's bar)
- ``sweep``    what a sweep compares beyond inject and training settings (``jl.sweep``, ``%%lora sweep``)
- ``chat``     how the chat generates (``%lora chat``, ``jl.chat``, ``jl.Conversation``, the chat widget's controls)

This module is long because it is the list: one declaration per setting, with its help, range and spellings.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .core.errors import UsageError, did_you_mean

__all__ = [
    "FORM_SECTIONS",
    "INITS",
    "KEEP",
    "METHODS",
    "OPTIMIZERS",
    "SETTINGS",
    "TASK_TYPES",
    "VARIANTS",
    "ChatSettings",
    "EstimateSettings",
    "InputSettings",
    "LoraSettings",
    "Setting",
    "SweepSettings",
    "TrainSettings",
    "canonical",
    "defaults",
    "form_sections",
    "keys",
    "name_of",
    "normalize_task_type",
    "panel_keys",
    "settings_help",
    "validate",
    "validate_one",
]

VARIANTS = ("lora", "dora", "rslora")
# PEFT's init_lora_weights values that need nothing but the model (loftq/eva/corda need data or extra configs).
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "mica", "zero")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "adafactor", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BIASES = ("none", "all", "lora_only")
PROGRESS = ("auto", "widget", "text")
CHAT_ADAPTER = ("on", "off", "side_by_side")
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")
# What a sweep run trains: LoRA, every base weight, the task head alone, or another PEFT method.
METHODS = ("lora", "full", "head", "prompt_tuning", "prefix_tuning", "ia3", "loha", "lokr")
KEEP = ("best", "none", "all")
# The panel's training form, in this order: (section, title, advanced). A training setting names its section with
# ``form=``; one that names none is under "more". Advanced sections start collapsed.
FORM_SECTIONS = (
    ("basic", "training", False),
    ("schedule", "schedule and optimizer", True),
    ("eval", "evaluation and early stopping", True),
    ("speed", "memory and speed", True),
    ("output", "checkpoints, logging and tracking", True),
    ("more", "more", True),
)

# PEFT's task types, with the spellings people type.
TASK_TYPES = {
    "CAUSAL_LM": "CAUSAL_LM",
    "CAUSAL-LM": "CAUSAL_LM",
    "CAUSAL": "CAUSAL_LM",
    "SEQ_2_SEQ_LM": "SEQ_2_SEQ_LM",
    "SEQ2SEQ": "SEQ_2_SEQ_LM",
    "SEQ2SEQ_LM": "SEQ_2_SEQ_LM",
    "SEQ_CLS": "SEQ_CLS",
    "CLASSIFICATION": "SEQ_CLS",
    "SEQUENCE_CLASSIFICATION": "SEQ_CLS",
    "TOKEN_CLS": "TOKEN_CLS",
    "TOKEN_CLASSIFICATION": "TOKEN_CLS",
    "QUESTION_ANS": "QUESTION_ANS",
    "QA": "QUESTION_ANS",
    "FEATURE_EXTRACTION": "FEATURE_EXTRACTION",
    "NONE": None,
}
_NEEDS_EXTRA = {
    "loftq": "LoftQ needs a loftq_config; quantise with `%lora base --4bit` and train on top instead",
    "eva": "EVA initialisation needs a data loader; use init: default (or pissa) here",
    "corda": "CorDA initialisation needs a calibration pass; use init: default (or pissa) here",
}


@dataclass(frozen=True)
class Setting:
    """One setting's declaration. ``kind``: int | float | bool | choice | auto_bool (auto, true, false) | text |
    spec (a target/layer spec: text or a list) | prompts (text or a list of texts) | eval | object.
    ``panel``: the panel shows a control for it beside the module tree (``panel_range`` narrows a slider to the
    useful part of ``minimum..maximum``). ``form``: the section of the panel's training form that shows a training
    setting (see ``FORM_SECTIONS``; "" puts it under "more", None leaves it out). ``trait``: the ``LoraMagics``
    option that changes its default (None: not one)."""

    name: str
    default: Any
    help: str
    kind: str
    scopes: tuple[str, ...]
    example: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    nullable: bool = False
    aliases: tuple[str, ...] = ()
    label: str = ""
    panel: bool = False
    panel_range: tuple[float, float, float] | None = None  # (min, max, step) of a slider (panel, chat)
    form: str | None = ""
    trait: str | None = None
    check: Callable[[Any, Setting], Any] | None = None  # extra normalisation after the generic checks

    def describe(self) -> str:
        """The allowed values in words, for error messages and help."""
        if self.kind in ("choice", "auto_bool"):
            values = [_show(c) for c in self.choices]
            text = " | ".join(values)
        elif self.kind in ("int", "float"):
            text = _number_words(self)
        else:
            text = {
                "bool": "true | false",
                "text": "text",
                "spec": "text or a list",
                "prompts": "a prompt or a list of prompts",
                "eval": "auto, a fraction, a count or 0",
                "object": "a variable",
            }.get(self.kind, self.kind)
        return f"{text} (or null)" if self.nullable and self.kind != "object" else text


def _number_words(s: Setting) -> str:
    """``a positive whole number (at least 1)``, ``a number in [0, 1)``, ``a positive number below 1`` ..."""
    what = "whole number" if s.kind == "int" else "number"
    lo, hi = s.minimum, s.maximum
    upper = "" if hi is None else f" {'below' if s.exclusive_max else 'at most'} {_show(hi)}"
    if lo == 0 and s.exclusive_min:
        return f"a positive {what}{upper}"
    if s.kind == "int" and lo == 1:
        return f"a positive whole number (at least 1){upper}"
    if lo is not None and hi is not None:
        return (
            f"in {'(' if s.exclusive_min else '['}{_show(lo)}, {_show(hi)}{')' if s.exclusive_max else ']'}"
        )
    if lo is not None:
        return f"a {what} {'above' if s.exclusive_min else 'of at least'} {_show(lo)}"
    return f"a {what}{upper}"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _setting(default: Any, help: str, kind: str, scopes: str, **meta: Any) -> Any:
    """A dataclass field carrying its ``Setting`` (the name is filled in when the schema is read)."""
    return field(
        default=default,
        metadata={
            "setting": dict(default=default, help=help, kind=kind, scopes=tuple(scopes.split()), **meta)
        },
    )


# ------------------------------------------------------------------------------------------------ extra checks


def _check_alpha(value: Any, s: Setting) -> Any:
    if isinstance(value, str) and value.strip().lower().replace(" ", "") in ("2r", "2*r"):
        return None
    return _number(value, s)


def _check_init(value: Any, s: Setting) -> str:
    if value is True:
        return "default"
    if value is False:
        return "zero"
    key = str(value).strip().lower()
    if key in _NEEDS_EXTRA:
        raise UsageError(f"`init` {value!r} is not available here: {_NEEDS_EXTRA[key]}.")
    if key in INITS:
        return key
    if key.startswith("pissa_niter_"):
        niter = key.removeprefix("pissa_niter_")
        if niter.isdigit() and int(niter) > 0:
            return key
        raise UsageError(
            f"`init` {value!r}: the number of subspace iterations after pissa_niter_ must be a positive whole "
            "number, e.g. pissa_niter_4."
        )
    raise UsageError(
        f"`init` must be one of {', '.join(INITS)} (or pissa_niter_N), got {value!r}.{did_you_mean(key, INITS)}"
    )


def normalize_task_type(value: Any) -> str | None:
    """PEFT task type from a user spelling (``causal-lm``, ``seq_cls``, ``qa``, ``none`` ...)."""
    if value is None:
        return None
    key = str(value).strip().upper().replace(" ", "_")
    if key in TASK_TYPES:
        return TASK_TYPES[key]
    names = sorted({v for v in TASK_TYPES.values() if v} | {"none"})
    raise UsageError(
        f"`task_type` must be one of {', '.join(names)}; got {value!r}.{did_you_mean(key, TASK_TYPES)}"
    )


def _check_task_type(value: Any, s: Setting) -> str | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return normalize_task_type(value)


# What a training run can train, with the spellings people type: text (causal LM, classifier), image and audio
# classification, speech recognition (Whisper-style encoder-decoders and CTC models).
TRAIN_TASKS = {
    "AUTO": "auto",
    "CAUSAL_LM": "CAUSAL_LM",
    "CAUSAL": "CAUSAL_LM",
    "SEQ_CLS": "SEQ_CLS",
    "CLASSIFICATION": "SEQ_CLS",
    "SEQ_CLASSIFICATION": "SEQ_CLS",
    "IMAGE_CLS": "IMAGE_CLS",
    "IMAGE_CLASSIFICATION": "IMAGE_CLS",
    "AUDIO_CLS": "AUDIO_CLS",
    "AUDIO_CLASSIFICATION": "AUDIO_CLS",
    "ASR": "ASR",
    "SPEECH_RECOGNITION": "ASR",
    "SPEECH_TO_TEXT": "ASR",
}


def _check_task(value: Any, s: Setting) -> str:
    key = str(value).strip().upper().replace("-", "_")
    if key not in TRAIN_TASKS:
        names = ", ".join(str(c) for c in s.choices)
        raise UsageError(
            f"`task` must be one of {names}; got {value!r}.{did_you_mean(key.lower(), s.choices)}"
        )
    return TRAIN_TASKS[key]


def _check_labels(value: Any, s: Setting) -> tuple[str, ...]:
    if isinstance(value, str):  # "neg, pos" or "[neg, pos]" as typed on a line or in a form field
        text = value.strip()
        text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        value = [x.strip().strip("'\"") for x in text.split(",")]
    names = value
    if not isinstance(names, (list, tuple)) or not names:
        raise UsageError(
            f"`labels` must be the class names in id order, e.g. [negative, positive], got {value!r}."
        )
    names = [str(x).strip() for x in names]
    if any(not x for x in names) or len(set(names)) != len(names):
        raise UsageError(f"`labels` must be distinct, non-empty class names in id order, got {value!r}.")
    return tuple(names)


def _check_lr(value: Any, s: Setting) -> float:
    value = _number(value, s)
    if not 1e-5 <= value <= 1e-3:
        warnings.warn(
            f"lr={value:g} is outside the usual LoRA range 1e-5..1e-3 (2e-4 is a good start).",
            UserWarning,
            stacklevel=4,
        )
    return value


def _check_eval(value: Any, s: Setting) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if value is None or value is False:
        return 0
    if _is_int(value) and value >= 0:
        return int(value)
    if _is_number(value) and math.isfinite(value) and 0 <= value < 1:
        return float(value)
    raise UsageError(
        f"`eval` must be auto, a fraction below 1 (0.1 = 10% held out), a number of examples or 0, got {value!r}."
    )


# ------------------------------------------------------------------------------------------------ the settings


@dataclass(frozen=True)
class LoraSettings:
    """What to inject. ``alpha=None`` means 2·r. ``targets=None`` means PEFT's default for the architecture."""

    r: int = _setting(
        16,
        "rank of the update B·A",
        "int",
        "inject estimate",
        minimum=1,
        maximum=1 << 16,  # past any useful rank; a larger one would only fail allocating the adapter
        example="16",
        aliases=("rank", "lora_r"),
        label="rank r",
        panel=True,
        panel_range=(1, 256, 1),
        trait="default_r",
    )
    alpha: float | None = _setting(
        None,
        "scale: the update is multiplied by alpha/r (default 2*r)",
        "float",
        "inject estimate",
        minimum=0,
        exclusive_min=True,
        nullable=True,
        example="32",
        aliases=("lora_alpha",),
        panel=True,
        panel_range=(0.5, 512, 0.5),
        trait="default_alpha",
        check=_check_alpha,
    )
    dropout: float = _setting(
        0.0,
        "dropout on the adapter's input",
        "float",
        "inject estimate",
        minimum=0,
        maximum=1,
        exclusive_max=True,
        example="0.05",
        aliases=("lora_dropout",),
        panel=True,
        panel_range=(0, 0.5, 0.01),
        trait="default_dropout",
    )
    targets: Any = _setting(
        None,
        "names, globs (*.attn.c_attn), re:<regex>, or attention | mlp | all-linear | qv | experts | vision",
        "spec",
        "inject estimate",
        nullable=True,
        example="q_proj, v_proj",
        aliases=("target", "target_modules"),
        panel=True,
        trait="default_targets",
    )
    layers: Any = _setting(
        None,
        "only modules in these blocks: indices and ranges",
        "spec",
        "inject estimate",
        nullable=True,
        example="0-11, 20",
        aliases=("layers_to_transform",),
        panel=True,
    )
    exclude: Any = _setting(
        None,
        "modules to leave out (same spellings as targets)",
        "spec",
        "inject estimate",
        nullable=True,
        example="lm_head",
        aliases=("exclude_modules",),
    )
    variant: str = _setting(
        "lora",
        "plain LoRA, DoRA (weight-decomposed) or rsLoRA (alpha/sqrt(r))",
        "choice",
        "inject estimate",
        choices=VARIANTS,
        example="lora",
        panel=True,
        trait="default_variant",
    )
    init: str = _setting(
        "default",
        "initialisation of A and B (PEFT's init_lora_weights), or pissa_niter_N",
        "choice",
        "inject estimate",
        choices=INITS,
        example="default",
        aliases=("init_lora_weights",),
        panel=True,
        trait="default_init",
        check=_check_init,
    )
    modules_to_save: Any = _setting(
        None,
        "modules trained fully and saved with the adapter (e.g. a new head)",
        "spec",
        "inject estimate",
        nullable=True,
        example="classifier",
    )
    bias: str = _setting(
        "none",
        "which biases train too",
        "choice",
        "inject estimate",
        choices=BIASES,
        example="none",
        trait="default_bias",
    )
    task_type: str | None = _setting(
        "auto",
        "PEFT task type (auto: from the model's class)",
        "choice",
        "inject estimate",
        choices=("auto", *sorted({v for v in TASK_TYPES.values() if v})),
        nullable=True,
        example="auto",
        check=_check_task_type,
    )


@dataclass(frozen=True)
class TrainSettings:
    """How to train. ``steps`` (optimizer steps) wins over ``epochs``. ``warmup`` < 1 is a fraction of the steps,
    else a step count. ``eval``: auto (10% held out when there are ≥ 100 examples), a fraction, a count, or 0."""

    steps: int | None = _setting(
        None,
        "optimizer steps (wins over epochs)",
        "int",
        "train",
        minimum=1,
        nullable=True,
        example="200",
        aliases=("max_steps",),
        trait="default_steps",
        form="basic",
    )
    epochs: float = _setting(
        1.0,
        "passes over the data",
        "float",
        "train",
        minimum=0,
        exclusive_min=True,
        example="1",
        aliases=("num_epochs", "num_train_epochs"),
        trait="default_epochs",
        form="basic",
    )
    lr: float = _setting(
        2e-4,
        "peak learning rate",
        "float",
        "train",
        minimum=0,
        maximum=1,
        exclusive_min=True,
        exclusive_max=True,
        example="2e-4",
        aliases=("learning_rate",),
        trait="default_lr",
        check=_check_lr,
        form="basic",
    )
    batch: int = _setting(
        8,
        "examples per micro-batch",
        "int",
        "train estimate",
        minimum=1,
        example="8",
        aliases=("batch_size", "per_device_train_batch_size"),
        trait="default_batch",
        form="basic",
    )
    grad_accum: int = _setting(
        1,
        "micro-batches per optimizer step",
        "int",
        "train",
        minimum=1,
        example="1",
        aliases=("gradient_accumulation_steps",),
        trait="default_grad_accum",
        form="basic",
    )
    seq: int = _setting(
        512,
        "tokens per example (longer ones are truncated)",
        "int",
        "train estimate",
        minimum=1,
        example="512",
        aliases=("max_seq_len", "seq_len", "max_length"),
        trait="default_seq",
        form="basic",
    )
    warmup: float = _setting(
        0.03,
        "warm-up: a fraction of the steps (< 1) or a number of steps",
        "float",
        "train",
        minimum=0,
        example="0.03",
        aliases=("warmup_ratio",),
        trait="default_warmup",
        form="schedule",
    )
    scheduler: str = _setting(
        "cosine",
        "learning-rate schedule",
        "choice",
        "train",
        choices=SCHEDULERS,
        example="cosine",
        aliases=("lr_scheduler", "lr_scheduler_type"),
        trait="default_scheduler",
        form="schedule",
    )
    weight_decay: float = _setting(
        0.0,
        "AdamW weight decay",
        "float",
        "train",
        minimum=0,
        example="0",
        trait="default_weight_decay",
        form="schedule",
    )
    max_grad_norm: float | None = _setting(
        1.0,
        "gradient clipping norm (null: no clipping)",
        "float",
        "train",
        minimum=0,
        exclusive_min=True,
        nullable=True,
        example="1.0",
        trait="default_max_grad_norm",
        form="schedule",
    )
    optim: str = _setting(
        "adamw",
        "optimizer (8-bit and paged ones need bitsandbytes)",
        "choice",
        "train estimate",
        choices=OPTIMIZERS,
        example="adamw",
        aliases=("optimizer",),
        trait="default_optim",
        form="schedule",
    )
    eval: Any = _setting(
        "auto",
        "held-out share: auto, a fraction, a count, or 0",
        "eval",
        "train",
        example="auto",
        trait="default_eval",
        check=_check_eval,
        form="eval",
    )
    eval_every: int | None = _setting(
        None,
        "evaluate every N steps",
        "int",
        "train",
        minimum=1,
        nullable=True,
        example="50",
        aliases=("eval_steps",),
        form="eval",
    )
    save_every: int | None = _setting(
        None,
        "checkpoint every N steps",
        "int",
        "train",
        minimum=1,
        nullable=True,
        example="100",
        aliases=("save_steps",),
        form="output",
    )
    output_dir: str | None = _setting(
        None,
        "where checkpoints go (default lora_runs/<model>-<time>)",
        "text",
        "train",
        nullable=True,
        example="lora_runs/x",
        form="basic",
    )
    keep_checkpoints: int = _setting(
        2,
        "checkpoints kept on disk",
        "int",
        "train",
        minimum=1,
        example="2",
        aliases=("save_total_limit",),
        trait="default_keep_checkpoints",
        form="output",
    )
    packing: bool = _setting(
        False,
        "pack short examples into full sequences (no padding)",
        "bool",
        "train",
        example="false",
        trait="default_packing",
        form="speed",
    )
    ckpt: Any = _setting(
        "auto",
        "gradient checkpointing (auto: on for 4/8-bit bases; offload: checkpoints in host memory)",
        "auto_bool",
        "train estimate",
        choices=("auto", True, False, "offload"),
        example="auto",
        aliases=("gradient_checkpointing",),
        label="grad. checkpointing",
        trait="default_ckpt",
        form="basic",
    )
    samples: tuple[str, ...] = _setting(
        (), "prompts generated from during training", "prompts", "train", example='["Once upon a time"]'
    )
    sample_every: int | None = _setting(
        None, "generate the samples every N steps", "int", "train", minimum=1, nullable=True, example="50"
    )
    max_new_tokens: int = _setting(
        40,
        "tokens generated per sample (and per side by %lora compare, per chat reply)",
        "int",
        "train chat",
        minimum=1,
        maximum=1 << 16,  # past any model's context; a larger number is a typo
        example="40",
        panel_range=(1, 1024, 1),
        trait="max_new_tokens",
    )
    seed: int = _setting(
        0,
        "random seed (data order, initialisation; chat sampling, the same for base and adapter)",
        "int",
        "train chat",
        minimum=0,
        example="0",
        trait="default_seed",
        form="schedule",
    )
    early_stop: int | None = _setting(
        None,
        "stop after N evaluations without improvement",
        "int",
        "train",
        minimum=1,
        nullable=True,
        example="3",
        aliases=("patience",),
        form="eval",
    )
    keep_best: bool | None = _setting(
        None,
        "end with the best evaluated adapter (default: on with early_stop)",
        "bool",
        "train",
        nullable=True,
        example="true",
        aliases=("load_best_model_at_end",),
        form="eval",
    )
    log_every: int | None = _setting(
        None,
        "report the loss every N steps",
        "int",
        "train",
        minimum=1,
        nullable=True,
        example="10",
        aliases=("logging_steps",),
        form="output",
    )
    precision: str = _setting(
        "auto",
        "compute precision (auto: bf16 where the GPU has it)",
        "choice",
        "train",
        choices=PRECISIONS,
        example="auto",
        trait="default_precision",
        form="speed",
    )
    task: str = _setting(
        "auto",
        "what to train: auto (from the model), causal_lm, seq_cls, image_cls, audio_cls or asr (speech to text)",
        "choice",
        "train",
        choices=("auto", "causal_lm", "seq_cls", "image_cls", "audio_cls", "asr"),
        example="auto",
        check=_check_task,
    )
    labels: tuple[str, ...] | None = _setting(
        None,
        "class names in id order for classification (default: the model's own names, else the data's labels)",
        "text",
        "train",
        nullable=True,
        example="[negative, positive]",
        check=_check_labels,
    )
    text_column: str | None = _setting(
        None,
        "the column trained on as plain text (default: found from the column names)",
        "text",
        "train",
        nullable=True,
        example="body",
    )
    label_column: str | None = _setting(
        None,
        "the class label column of seq_cls, image_cls and audio_cls data (default: label, class, category, ...)",
        "text",
        "train",
        nullable=True,
        example="sentiment",
    )
    image_column: str | None = _setting(
        None,
        "the column holding the images of image_cls data (default: image, img, pixel_values, ...)",
        "text",
        "train",
        nullable=True,
        example="img_path",
    )
    audio_column: str | None = _setting(
        None,
        "the column holding the audio of audio_cls and asr data (default: audio, speech, path, ...)",
        "text",
        "train",
        nullable=True,
        example="wav",
    )
    chat_template: str | None = _setting(
        None,
        "formats `messages`: a Jinja template, or the name of one of the tokenizer's templates (default: its own)",
        "text",
        "train",
        nullable=True,
        example="default",
    )
    report_to: str = _setting(
        "none",
        "experiment tracking through the Trainer's integrations (pip install 'jupyter-lora[track]')",
        "choice",
        "train",
        choices=TRACKERS,
        example="tensorboard",
        trait="default_report_to",
        form="output",
    )
    run_name: str | None = _setting(
        None,
        "the run's name in the tracker",
        "text",
        "train",
        nullable=True,
        example="lora-r16",
        form="output",
    )
    kernels: str = _setting(
        "auto",
        "fused Liger kernels: RMSNorm, SwiGLU, RoPE, linear+cross-entropy (auto: on CUDA when liger-kernel is "
        "installed)",
        "choice",
        "train",
        choices=("auto", "liger", "none"),
        example="auto",
        trait="default_kernels",
        form="speed",
    )
    chunked_loss: Any = _setting(
        "auto",
        "LM loss in chunks, no full fp32 logits (auto: on CUDA without Liger)",
        "auto_bool",
        "train",
        choices=("auto", True, False),
        example="auto",
        trait="default_chunked_loss",
        form="speed",
    )


@dataclass(frozen=True)
class EstimateSettings:
    """What a memory estimate assumes about the base model beyond the training settings."""

    dtype: str | None = _setting(
        None,
        "weight dtype of the base (default: as loaded)",
        "choice",
        "estimate",
        choices=("bf16", "fp16", "fp32"),
        nullable=True,
        example="bf16",
    )
    quant: str | None = _setting(
        None,
        "a 4/8-bit base (default: as loaded; in a sweep: 4bit or none)",
        "choice",
        "estimate sweep",
        choices=("4bit", "8bit"),
        nullable=True,
        example="4bit",
        label="base",
        panel=True,
    )
    audio_seconds: float = _setting(
        30.0,
        "length of one audio clip for an audio model's estimate (Whisper always reads 30 s)",
        "float",
        "estimate",
        minimum=0,
        maximum=3600,
        exclusive_min=True,
        example="10",
    )


def _check_chat_adapter(value: Any, s: Setting) -> str:
    # YAML reads `adapter: on` / `adapter: off` as true / false
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, str):
        value = value.strip().replace(" ", "_")
    return _choice(value, s)


@dataclass(frozen=True)
class ChatSettings:
    """How the chat generates. ``temperature`` 0 is greedy decoding (``top_p`` then plays no part)."""

    temperature: float = _setting(
        0.7,
        "sampling temperature (0: greedy, always the most likely token)",
        "float",
        "chat",
        minimum=0,
        maximum=2,
        example="0.7",
        panel_range=(0, 2, 0.05),
        trait="default_temperature",
    )
    top_p: float = _setting(
        0.9,
        "nucleus sampling: draw from the most likely tokens that together hold this probability",
        "float",
        "chat",
        minimum=0,
        maximum=1,
        exclusive_min=True,
        example="0.9",
        panel_range=(0.05, 1, 0.05),
        trait="default_top_p",
    )
    adapter: str = _setting(
        "on",
        "answer with the adapter, without it (the base model), or both side by side",
        "choice",
        "chat",
        choices=CHAT_ADAPTER,
        example="side_by_side",
        trait="chat_adapter",
        check=_check_chat_adapter,
    )
    system: str | None = _setting(
        None,
        "a system message before the conversation (chat templates only)",
        "text",
        "chat",
        nullable=True,
        example="You are a concise assistant.",
    )


@dataclass(frozen=True)
class InputSettings:
    """What a training run reads from the notebook (variables or paths) and how it shows progress."""

    data: Any = _setting(
        None,
        "a variable (texts, records, Dataset, DataFrame) or a .jsonl/.json/.csv/.txt path",
        "object",
        "train",
        example="texts",
        form="basic",
    )
    tokenizer: Any = _setting(
        None,
        "default: the one tokenizer in the notebook, or the model's own",
        "object",
        "train",
        example="tok",
        form="basic",
    )
    processor: Any = _setting(
        None,
        "the model's processor for images or audio (default: the one in the notebook, or the model's own)",
        "object",
        "train",
        example="processor",
        form="basic",
    )
    eval_data: Any = _setting(
        None,
        "held-out data instead of a split of `data`",
        "object",
        "train",
        example="val_texts",
        form="eval",
    )
    trainer_args: Any = _setting(
        None,
        "any other transformers.TrainingArguments field, e.g. {logging_first_step: true}",
        "object",
        "train",
        example="{dataloader_num_workers: 2}",
    )
    progress: str = _setting(
        "auto",
        "progress display",
        "choice",
        "train",
        choices=PROGRESS,
        example="auto",
        trait="progress",
        form=None,
    )


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep compares beyond the inject and training settings (each may vary from run to run)."""

    method: str = _setting(
        "lora",
        "what a run trains: lora, full (every weight), head (the task head alone), or PEFT's prompt_tuning, "
        "prefix_tuning, ia3, loha, lokr",
        "choice",
        "sweep",
        choices=METHODS,
        example="lora",
    )
    num_virtual_tokens: int = _setting(
        20,
        "virtual tokens of a prompt_tuning or prefix_tuning run",
        "int",
        "sweep",
        minimum=1,
        maximum=1 << 14,
        example="20",
    )
    keep: str = _setting(
        "best",
        "what the model holds after the sweep: the best run, none (the base as before) or all runs (LoRA runs)",
        "choice",
        "sweep",
        choices=KEEP,
        example="best",
    )


GROUPS = (LoraSettings, TrainSettings, EstimateSettings, ChatSettings, InputSettings, SweepSettings)


def _read_schema() -> dict[str, Setting]:
    found: dict[str, Setting] = {}
    for group in GROUPS:
        for f in fields(group):
            found[f.name] = Setting(name=f.name, **f.metadata["setting"])
    aliases = [a for s in found.values() for a in s.aliases]
    clash = (set(aliases) & set(found)) | {a for a in aliases if aliases.count(a) > 1}
    assert not clash, f"setting aliases must be unique and differ from names: {sorted(clash)}"
    return found


SETTINGS: dict[str, Setting] = _read_schema()
_ALIAS_OF = {alias: s.name for s in SETTINGS.values() for alias in s.aliases}


def name_of(spelling: Any) -> str | None:
    """The setting a name or other spelling refers to (None: no setting is spelled so)."""
    if not isinstance(spelling, str):
        return None
    name = _ALIAS_OF.get(spelling, spelling)
    return name if name in SETTINGS else None


def keys(scope: str) -> tuple[str, ...]:
    """The settings a command takes, in declaration order."""
    return tuple(name for name, s in SETTINGS.items() if scope in s.scopes)


def aliases(scope: str) -> tuple[str, ...]:
    """The other spellings those settings accept (PEFT's and transformers' names)."""
    return tuple(a for name in keys(scope) for a in SETTINGS[name].aliases)


def defaults(scope: str) -> dict[str, Any]:
    """``{name: default}`` for the settings of ``scope``."""
    return {name: SETTINGS[name].default for name in keys(scope)}


def _canonical(given: Mapping[str, Any], names: tuple[str, ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in given.items():
        name = _ALIAS_OF.get(key, key) if isinstance(key, str) else key
        if name not in names:
            elsewhere = SETTINGS.get(name)
            if elsewhere is not None:
                where = f" `{name}` ({elsewhere.help}) is not one of the settings taken here."
            else:
                spellings = names + tuple(a for n in names for a in SETTINGS[n].aliases)
                where = did_you_mean(str(key), spellings)
            raise UsageError(f"Unknown {what} `{key}`.{where} Settings: {', '.join(names)}.")
        if name in out and out[name] != value:
            raise UsageError(
                f"`{name}` was given twice with different values: {out[name]!r} (as `{spelled[name]}`) and "
                f"{value!r} (as `{key}`); keep one."
            )
        out[name] = value
        spelled[name] = key
    return out


def canonical(
    given: Mapping[str, Any], scope: str | tuple[str, ...], what: str = "setting"
) -> dict[str, Any]:
    """``given`` with aliases replaced by names; an unknown key or a setting given twice is a UsageError.
    ``scope``: a command's scope, or the names allowed."""
    return _canonical(given, keys(scope) if isinstance(scope, str) else scope, what)


def panel_keys() -> tuple[str, ...]:
    """The settings the panel shows a control for beside the module tree."""
    return tuple(name for name, s in SETTINGS.items() if s.panel)


def form_sections() -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """The panel's training form: ``(section, title, advanced, setting names)`` for each section of
    ``FORM_SECTIONS`` that holds a setting. Every training setting is in one, unless it declares ``form=None``;
    within a section the notebook inputs (data, tokenizer: variables) come first, then declaration order."""
    known = {name for name, _, _ in FORM_SECTIONS}
    placed: dict[str, list[str]] = {name: [] for name in known}
    for name in keys("train"):
        section = SETTINGS[name].form
        if section is None:
            continue
        assert not section or section in known, f"setting {name}: unknown form section {section!r}"
        placed[section or "more"].append(name)
    return [
        (section, title, advanced, tuple(sorted(placed[section], key=lambda n: SETTINGS[n].kind != "object")))
        for section, title, advanced in FORM_SECTIONS
        if placed[section]
    ]


def validate(given: Mapping[str, Any], scope: str | tuple[str, ...], what: str = "setting") -> dict[str, Any]:
    """Canonical names and checked, normalised values for the settings ``given`` (only those)."""
    return {name: validate_one(name, value) for name, value in canonical(given, scope, what).items()}


def build(group: type, given: Mapping[str, Any], what: str = "setting") -> Any:
    """An instance of the settings dataclass ``group`` from ``given`` (aliases allowed), every value checked."""
    values = _canonical(given, tuple(f.name for f in fields(group)), what)
    return group(**{name: validate_one(name, value) for name, value in values.items()})


def validate_one(name: str, value: Any) -> Any:
    """One setting's value, checked and normalised; a UsageError names the setting, the value and the fix."""
    s = SETTINGS[name]
    if value is None and (s.nullable or s.kind == "object"):
        return None
    if s.check is not None:
        return s.check(value, s)
    kind = s.kind
    if kind == "int":
        return _whole(value, s)
    if kind == "float":
        return _number(value, s)
    if kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"`{name}` must be true or false, got {value!r}.")
        return value
    if kind in ("choice", "auto_bool"):
        return _choice(value, s)
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"`{name}` must be text ({s.help}), got {value!r}.")
        return value
    if kind == "spec":
        return _spec(value, s)
    if kind == "prompts":
        value = (value,) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise UsageError(f"`{name}` must be prompts (strings), got {value!r}.")
        return tuple(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_INT64_MAX = 2**63 - 1  # whole-number settings end up in torch / numpy / the Trainer as 64-bit integers


def _whole(value: Any, s: Setting) -> int:
    original = value
    if isinstance(value, float) and value.is_integer():  # 1e30 too: whole, and refused below as too large
        value = int(value)
    if not _is_int(value):
        raise UsageError(
            f"`{s.name}` must be a whole number like {s.example}, got {value!r} ({type(value).__name__})."
        )
    checked = _in_range(int(value), s, original)
    if abs(checked) > _INT64_MAX:
        raise UsageError(
            f"`{s.name}` must be a whole number below 2**63, got {original!r}. E.g. {s.name}: {s.example}."
        )
    return checked


def _number(value: Any, s: Setting) -> float:
    if _is_number(value) and not math.isfinite(value):
        raise UsageError(f"`{s.name}` must be {s.describe()}, got {value!r}. E.g. {s.name}: {s.example}.")
    if not _is_number(value):
        raise UsageError(
            f"`{s.name}` must be a finite number like {s.example}, got {value!r} ({type(value).__name__})."
        )
    return _in_range(float(value), s, value)


def _in_range(value: Any, s: Setting, original: Any) -> Any:
    lo, hi = s.minimum, s.maximum
    low = lo is not None and (value <= lo if s.exclusive_min else value < lo)
    high = hi is not None and (value >= hi if s.exclusive_max else value > hi)
    if low or high:
        raise UsageError(f"`{s.name}` must be {s.describe()}, got {original!r}. E.g. {s.name}: {s.example}.")
    return value


def _choice(value: Any, s: Setting) -> Any:
    if s.kind == "auto_bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false", "on", "off"):
            return {"auto": "auto", "true": True, "on": True, "false": False, "off": False}[
                value.strip().lower()
            ]
        if (
            isinstance(value, str) and value.strip().lower() in s.choices
        ):  # a further mode, e.g. ckpt: offload
            return value.strip().lower()
    elif isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        if key in s.choices:
            return key
    options = [_show(c) for c in s.choices]
    raise UsageError(
        f"`{s.name}` must be one of {', '.join(options)}, got {value!r}.{did_you_mean(str(value), options)}"
    )


def _spec(value: Any, s: Setting) -> Any:
    items = value if isinstance(value, (list, tuple)) else [value]
    ok = (str, int) if s.name == "layers" else (str,)
    if not items or not all(isinstance(x, ok) and not isinstance(x, bool) for x in items):
        spelled = (
            "text like `0-11, 20` or a list of layer indices"
            if s.name == "layers"
            else "comma-separated text like `q_proj, v_proj` or a list of strings"
        )
        raise UsageError(f"`{s.name}` must be {spelled}, got {value!r} ({type(value).__name__}).")
    return list(value) if isinstance(value, (list, tuple)) else value


def settings_help(scope: str | tuple[str, ...], indent: int = 8) -> str:
    """``name: example   help`` lines for ``%lora help``, from the declarations (a scope, or names)."""
    lines = []
    for name in keys(scope) if isinstance(scope, str) else scope:
        s = SETTINGS[name]
        allowed = f" [{s.describe()}]" if s.kind in ("choice", "auto_bool") else ""
        key = f"{name}: {s.example}"
        also = f" (also {', '.join(s.aliases)})" if s.aliases else ""
        lines.append(f"{' ' * indent}{key:<26} {s.help}{allowed}{also}")
    return "\n".join(lines)
