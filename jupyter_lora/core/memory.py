"""How much GPU memory LoRA training (and inference) of a model will take — from the model, its config, or a
local path/model id, without loading any weights.

The estimate is a sum of components, each from a documented formula (below). The activation and logits terms
carry coefficients in ``Calibration`` so that measurements on a real GPU can tune them without code changes.

Notation: ``T = batch · seq`` tokens, ``h`` hidden size, ``I`` MLP intermediate size, ``kv`` key/value width
(``kv_heads · head_dim``), ``L`` layers, ``V`` vocabulary, ``e`` bytes per activation element (2 for bf16/fp16
compute, 4 for fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..settings import SETTINGS, canonical, keys, validate_one
from .errors import UsageError
from .media import feature_encoder_elements, media_towers
from .modelinfo import base_model_of, is_peft_model, param_count
from .plan import Plan, PlanRow
from .plan import plan as make_plan
from .sources import loaded_quantization, model_dims, resolve_source, resolve_weight_dtype
from .targets import index_is_current, index_model, selection_key
from .units import fmt_bytes

__all__ = ["Calibration", "MemoryEstimate", "estimate"]

GiB = 1024**3

_QUANT = {None: None, "none": None, "4bit": "nf4", "nf4": "nf4", "fp4": "fp4", "8bit": "int8", "int8": "int8"}


@dataclass(frozen=True)
class Calibration:
    """Coefficients of the activation and overhead formulas (bytes are multiplied by these)."""

    activations: float = 1.0  # scales the per-layer activation sum
    logits_copies: float = (
        5.0  # logits held at the loss: bf16 out (e) + fp32 log-softmax (4) + its grad (4) ~ 5e
    )
    overhead_bytes: int = 256 * 1024**2  # cuBLAS workspaces, allocator slack, small buffers
    cuda_context_bytes: int = 500 * 1024**2  # driver context: outside torch's allocator, in nvidia-smi


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory for LoRA training with the given settings, by component, and for inference."""

    breakdown: dict[str, int]
    inference: dict[str, int]
    seq: int
    batch: int
    ckpt: bool
    optim: str
    dtype: str
    quant: str | None
    trainable_params: int
    total_params: int
    gpu_name: str | None = None
    gpu_capacity_bytes: int | None = None
    notes: tuple[str, ...] = ()
    dims: dict[str, Any] = field(default_factory=dict, compare=False)
    offload: bool = False  # checkpoints held in host memory (ckpt: offload)
    # what each example's sequence is when ``seq`` is not used (an image or audio encoder): "196 patches"
    positions: str = ""

    @property
    def shape(self) -> str:
        """``batch 8 × seq 512``, or what is used instead of seq: ``batch 8 × 196 patches``."""
        return f"batch {self.batch} × {self.positions or f'seq {self.seq}'}"

    @property
    def total_bytes(self) -> int:
        """Peak memory for one training step, including the CUDA context."""
        return sum(self.breakdown.values())

    @property
    def allocated_bytes(self) -> int:
        """The part torch's allocator sees (comparable with ``torch.cuda.max_memory_allocated()``)."""
        return self.total_bytes - self.breakdown.get("cuda_context", 0)

    @property
    def inference_bytes(self) -> int:
        return sum(self.inference.values())

    @property
    def fits(self) -> bool | None:
        """Whether training fits on the present GPU (None without one)."""
        return None if self.gpu_capacity_bytes is None else self.total_bytes <= self.gpu_capacity_bytes

    def __repr__(self) -> str:
        fits = "" if self.fits is None else f", {'fits' if self.fits else 'does not fit'} on {self.gpu_name}"
        return (
            f"MemoryEstimate(training {fmt_bytes(self.total_bytes)}, inference {fmt_bytes(self.inference_bytes)}; "
            f"{self.shape}, {self.dtype}{' ' + self.quant if self.quant else ''}, "
            f"{self.optim}{', ckpt' if self.ckpt else ''}{' (offload)' if self.offload else ''}{fits})"
        )


# ------------------------------------------------------------------------------------------------ formulas


def _weights_bytes(
    model: nn.Module, dtype: torch.dtype, quant: str | None, index, double_quant: bool = True
) -> tuple[int, int]:
    """(weight bytes, quantisation-constant bytes) of the frozen base.

    Unquantised: params × bytes(dtype); tied weights once. NF4/FP4 (bitsandbytes 4-bit, blocksize 64): 0.5 byte
    per weight of each Linear in the blocks, plus constants — with double quantisation an 8-bit absmax per 64
    weights and an fp32 absmax per 256 blocks (1/64 + 4/16384 byte/param; QLoRA's 0.127 bit), without it an
    fp32 absmax per 64 (4/64). LLM.int8: 1 byte per weight plus an fp32 scale per output row. Heads, output
    embeddings, embeddings, norms and biases stay in ``dtype`` (what transformers does with bitsandbytes).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = index.base_params
    if quant is None:
        return total * itemsize, 0
    heads = set(index.task.heads) | (
        {index.task.output_embeddings} if index.task.output_embeddings else set()
    )
    qparams = 0
    rows = 0
    for m in index.modules:
        if m.is_linear and not any(m.path == p or m.path.startswith(p + ".") for p in heads):
            qparams += m.weight_params
            rows += m.out_features
    rest = total - qparams
    if quant in ("nf4", "fp4"):
        weights = qparams // 2
        if double_quant:
            constants = qparams // 64 + (qparams // (64 * 256)) * 4 + 256
        else:
            constants = (qparams // 64) * 4
    else:
        weights = qparams
        constants = rows * 4
    return weights + rest * itemsize, constants


def _optimizer_bytes(optim: str, trainable: int) -> int:
    """AdamW: two fp32 moments (8 B/param). 8-bit AdamW (bitsandbytes, blockwise 2048): two 1-byte states plus an
    fp32 absmax per 2048 (≈2.004 B/param); the paged variant has the same GPU footprint until it pages out.
    Adafactor: factored second moment, roughly 4 B/param worst case for LoRA's thin matrices. SGD: one fp32 momentum
    buffer (training uses momentum 0.9)."""
    if optim in ("adamw", "paged_adamw"):
        return trainable * 8
    if optim in ("adamw8bit", "paged_adamw8bit"):
        return trainable * 2 + (trainable // 2048 + 1) * 8
    if optim in ("adafactor", "sgd"):
        return trainable * 4
    raise AssertionError(optim)


def _layer_activations(
    d: dict[str, Any], tokens: int, seq: int, e: int, attention: str, lora_inputs: int, dropout_inputs: int
) -> int:
    """Bytes one transformer layer keeps for backward when its weights are frozen.

    Frozen linears keep nothing (dx needs only W); what stays is:
      norms: their input (RMSNorm in HF upcasts to fp32: 4h; LayerNorm: e·h) — two norms per layer;
      attention (SDPA/flash): q (e·h), k and v (e·kv each), the output (e·h) and a logsumexp (4·heads);
        eager attention adds the score and probability matrices, 2·e·heads·seq per token, plus the mask;
      MLP: activation input (e·I), and for gated MLPs the activation output and the up projection (2·e·I);
      LoRA: each distinct input tensor that a lora_A reads (``lora_inputs`` elements per token, e bytes each),
        and with dropout a dropped copy plus a 1-byte mask per targeted module (``dropout_inputs``).
    """
    h, inter, kv = d["hidden"], d["intermediate"], d["kv_heads"] * d["head_dim"]
    norm = 4 * h if d["rms_norm"] else e * h
    per_token = 2 * norm
    per_token += e * (2 * h + 2 * kv) + 4 * d["heads"]
    if attention == "eager":
        per_token += 2 * e * d["heads"] * seq + d["heads"] * seq
    per_token += e * inter * (3 if d["gated_mlp"] else 1)
    per_token += e * lora_inputs + (e + 1) * dropout_inputs
    return per_token * tokens


def _lora_inputs(the_plan: Plan, d: dict[str, Any]) -> tuple[int, int]:
    """(distinct lora_A input elements per token and layer, dropout-copied elements per token and layer)."""
    layers = max(1, d["layers"])
    if the_plan.index is None:
        saved, read = _lora_input_widths(the_plan.modules)
    else:  # the same for every r, alpha and dropout of these targets: worked out once per target set
        spec = the_plan.spec
        saved, read = the_plan.index.remember(
            ("lora inputs", selection_key(spec.targets, spec.layers, spec.exclude)),
            lambda: _lora_input_widths(the_plan.modules),
        )
    return saved // layers, (read if the_plan.spec.dropout > 0 else 0) // layers


def _lora_input_widths(rows: Sequence[PlanRow]) -> tuple[int, int]:
    """(input widths the adapted modules save for backward, counted once per shared input; all their widths)."""
    groups = {}
    read = 0
    for row in rows:
        if row.role != "lora" or row.kind in ("embedding", "experts"):  # experts: see _moe_terms
            continue
        # q/k/v (and gate/up) read the same tensor: one saved input per (parent module, input width).
        parent = row.path.rsplit(".", 1)[0]
        if row.path.rsplit(".", 1)[-1] in (
            "o_proj",
            "out_proj",
            "dense",
            "c_proj",
            "o",
            "out_lin",
            "wo",
            "down_proj",
            "fc2",
            "dense_4h_to_h",
            "lin2",
        ):
            parent = row.path
        groups[(parent, row.in_features)] = row.in_features
        read += row.in_features
    return sum(groups.values()), read


# ------------------------------------------------------------------------------------------------ mixture of experts


def _moe_terms(
    model: nn.Module,
    index: Any,
    the_plan: Plan,
    d: dict[str, Any],
    tokens: int,
    e: int,
    weight_dtype: torch.dtype,
    ckpt: Any,
    notes: list[str],
) -> tuple[dict[str, Any], int]:
    """(``d`` with the MLP width a token keeps live, extra activation bytes) for a mixture-of-experts model; ``d``
    and 0 for a dense one.

    Routed experts: a token runs through ``k`` of the ``n`` experts of each MoE block (``num_experts_per_tok``), so
    the MLP activations are those of ``k`` expert MLPs of the expert width (``I_e``, read from the experts' down
    projection) plus the shared experts' width, not of the config's ``intermediate_size``; dense layers (DeepSeek's
    first ones) keep theirs. ``intermediate`` becomes the average over the layers, so the per-layer formula holds.
    Each routed copy of a token's hidden state (``k·h`` per token and MoE layer) and the router's fp32
    probabilities (``4·n``) are kept too.

    Adapted expert weights: PEFT applies LoRA to a fused expert weight by rebuilding it as ``W + scaling·B·A`` (in
    the weight's dtype) on each forward; the matmuls keep that rebuilt stack for backward — one full copy of each
    adapted expert weight per layer (of one layer at a time with gradient checkpointing), plus its gradient, one
    weight at a time, while backward runs. Their LoRA A/B (``r·experts`` rows) are in the plan's counts already
    (weights, gradients and optimizer states)."""
    experts = [m for m in index.modules if m.kind == "experts"]
    if not experts:
        return d, 0
    config = getattr(base_model_of(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    owners: dict[str, list[Any]] = {}
    for m in experts:
        owners.setdefault(m.module_path, []).append(m)
    n = max(m.experts for m in experts)
    k = _config_int(config, ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"), n)
    layers = max(1, d["layers"])
    moe_layers = min(layers, len(owners))
    expert_width = []
    for weights in owners.values():
        down = [w for w in weights if w.suffix in ("down_proj", "w2")]
        expert_width.append(
            down[0].in_features if down else min(weights[0].in_features, weights[0].out_features)
        )
    width = max(expert_width)
    shared = _shared_width(index, owners)
    live = k * width + shared
    dense = d["intermediate"]
    d = {**d, "intermediate": (moe_layers * live + (layers - moe_layers) * dense) // layers}
    routed = moe_layers * tokens * (e * k * d["hidden"] + 4 * n)
    if not ckpt:
        extra = routed
    else:  # one layer's worth, while it is recomputed
        extra = routed // moe_layers

    itemsize = torch.empty((), dtype=weight_dtype).element_size()
    adapted = [index.by_path[r.path] for r in the_plan.modules if r.role == "lora" and r.kind == "experts"]
    if adapted:
        by_layer: dict[Any, int] = {}
        for info in adapted:
            by_layer[info.layer] = by_layer.get(info.layer, 0) + info.weight_params * itemsize
        rebuilt = max(by_layer.values()) if ckpt else sum(by_layer.values())
        rebuilt += max(info.weight_params for info in adapted) * itemsize  # its gradient, during backward
        extra += rebuilt
        notes.append(
            f"{len(adapted)} adapted expert weights are rebuilt as W + ΔW on each forward and kept for backward "
            f"({fmt_bytes(rebuilt)} in activations)"
        )
    notes.append(f"mixture of experts: {k} of {n} experts run per token in {moe_layers} layers")
    return d, extra


def _config_int(config: Any, names: Sequence[str], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _shared_width(index: Any, owners: dict[str, list[Any]]) -> int:
    """The intermediate width of the shared experts beside the routed ones (Qwen2-MoE's ``shared_expert``,
    DeepSeek's ``shared_experts``): the input width of their down projection, in one MoE block."""
    block = next(iter(owners)).rsplit(".", 1)[0]
    downs = [
        m.in_features
        for m in index.modules
        if m.is_linear and m.path.startswith(block + ".") and m.suffix in ("down_proj", "w2")
    ]
    return sum(downs)


def _media_activations(
    model: nn.Module,
    index,
    d: dict[str, Any],
    the_plan: Plan,
    seq: int,
    batch: int,
    e: int,
    ckpt: bool | str,
    attention: str,
    audio_seconds: float,
) -> tuple[int, int, list[str], str] | None:
    """(activation bytes, bytes of the largest single layer, notes, what the sequence is when ``seq`` is not used
    or "") of an image, audio or vision-language model:
    each tower over its own positions (``media.media_towers``); None for a text model.

    A tower keeps activations when gradients reach it: it, or a tower before it (an encoder a decoder reads),
    holds adapted modules. Per kept tower: ``_layer_activations`` per layer over its positions, its adapted
    modules' inputs counted per layer; a decoder that attends to an encoder keeps per layer its cross-attention
    query and output (e·h per token each) and the keys and values of every encoder frame (2·e·kv per frame);
    and the tower's input and final-norm output (2·e·h per position). With checkpointing, each layer's input and
    one layer recomputed at a time.
    """
    found = media_towers(model, index.layer_lists, d["rms_norm"], d["gated_mlp"], seq, audio_seconds)
    if found is None:
        return None
    towers, notes = found
    positions = ""
    if not any(t.what.startswith("seq ") for t in towers):  # seq is not used: what is ("196 patches")
        positions = towers[0].what.split(" of ")[0].split(" from ")[0].split(" (")[0]
    rows = [r for r in the_plan.modules if r.role == "lora"]
    total = 0
    largest = 0
    flowing = False
    for tower in towers:
        mine = [r for r in rows if tower.prefix and r.path.startswith(tower.prefix + ".")]
        flowing = flowing or bool(mine) or not tower.prefix
        if not flowing:
            continue
        td = tower.dims
        layers = max(1, td["layers"])
        saved, read = _lora_input_widths(mine)
        lora_in = saved // layers
        dropout_in = (read if the_plan.spec.dropout > 0 else 0) // layers
        tokens = batch * tower.positions
        per_layer = _layer_activations(td, tokens, tower.positions, e, attention, lora_in, dropout_in)
        if tower.cross:
            kv = td["kv_heads"] * td["head_dim"]
            norm = 4 * td["hidden"] if td["rms_norm"] else e * td["hidden"]
            per_layer += (2 * e * td["hidden"] + norm + 4 * td["heads"]) * tokens
            per_layer += 2 * e * kv * tower.cross * batch
        if ckpt == "offload":
            kept = e * td["hidden"] * tokens + per_layer
        elif ckpt:
            kept = layers * e * td["hidden"] * tokens + per_layer
        else:
            kept = layers * per_layer
        total += kept + 2 * e * td["hidden"] * tokens
        largest = max(largest, per_layer)
    config = getattr(base_model_of(model), "config", None)
    if getattr(config, "conv_stride", None) and getattr(config, "conv_dim", None):
        total += e * batch * feature_encoder_elements(model, config, audio_seconds)
    return total, largest, notes, positions


def _reads_raw_audio(model: nn.Module) -> bool:
    """Whether the model's input is raw audio whose length ``audio_seconds`` sets (wav2vec2, HuBERT)."""
    config = getattr(base_model_of(model), "config", None)
    return bool(getattr(config, "conv_stride", None) and getattr(config, "conv_kernel", None))


def _hears(model: nn.Module) -> bool:
    """Whether the model reads audio at all (raw samples, or mel features as Whisper does)."""
    base = base_model_of(model)
    return _reads_raw_audio(base) or getattr(base, "main_input_name", None) in (
        "input_features",
        "input_values",
    )


def _gpu() -> tuple[str | None, int | None]:
    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, int(props.total_memory)


def estimate(
    source: Any,
    plan: Plan | None = None,
    *,
    seq: int = SETTINGS["seq"].default,
    batch: int = SETTINGS["batch"].default,
    ckpt: bool | str = SETTINGS["ckpt"].default,
    optim: str = SETTINGS["optim"].default,
    dtype: Any = None,
    quant: str | None = None,
    double_quant: bool | None = None,
    attention: str = "sdpa",
    chunked_loss: bool | None = None,
    kernels: str = SETTINGS["kernels"].default,
    calibration: Calibration = DEFAULT_CALIBRATION,
    audio_seconds: float | None = None,
    **settings: Any,
) -> MemoryEstimate:
    """Estimate peak GPU memory for LoRA training of ``source`` (a model, a transformers config, or a local
    path/model id — read as a config, no weights loaded) and memory for inference at the same batch × seq.

    ``plan``: the adapter to train (default: the adapter the model holds, or ``plan(model, **settings)``).
    ``seq``, ``batch``, ``ckpt``, ``optim``: as training would run (their defaults are training's: see
    ``jupyter_lora.settings``); ``ckpt="auto"`` is gradient checkpointing on for 4/8-bit bases, as in training.
    ``chunked_loss``: the LM loss computed in chunks (default: as the training engine does — on CUDA for
    Llama-family models). ``kernels``: as training's setting — where Liger's fused linear cross-entropy runs, the
    logits exist one small chunk of tokens at a time. ``dtype``: weight/compute dtype (default: the model's; bf16 for a bare config).
    ``quant``: None | 4bit | 8bit
    (default: how the model is loaded); ``double_quant``: 4-bit double quantisation (default: the model's, else on).

    Image and audio encoders run over the positions their input makes, not over ``seq`` (see ``core/media.py``):
    a ViT over its patches and class token, Whisper's encoder over its 1500 frames (``seq`` is its decoder's
    text), wav2vec2/HuBERT over the frames of ``audio_seconds`` of 16 kHz audio (default 30), a vision-language
    model's LM over ``seq`` text tokens plus the image tokens. The notes say which sequence was used.
    """
    given_seconds = audio_seconds is not None
    audio_seconds = validate_one(
        "audio_seconds", SETTINGS["audio_seconds"].default if audio_seconds is None else audio_seconds
    )
    # the settings' other spellings (batch_size, max_seq_len, ...) reach the options they name
    options = {"seq": seq, "batch": batch, "ckpt": ckpt, "optim": optim, "dtype": dtype, "quant": quant}
    settings = canonical(settings, keys("estimate"), "estimate setting")
    options.update({k: settings.pop(k) for k in list(settings) if k in options})
    seq, batch, ckpt, optim, dtype, quant = options.values()
    seq = validate_one("seq", seq)
    batch = validate_one("batch", batch)
    optim_key = validate_one("optim", optim)
    ckpt = validate_one("ckpt", ckpt)
    quant_key = _QUANT.get(quant if quant is None else str(quant).lower(), "?")
    if quant_key == "?":
        raise UsageError(f"`quant` must be none, 4bit (nf4), fp4 or 8bit, got {quant!r}.")
    if attention not in ("sdpa", "eager", "flash"):
        raise UsageError(f"`attention` must be sdpa, flash or eager, got {attention!r}.")
    model = resolve_source(source, "estimate")
    # The index the plan was just made from serves when nothing was registered since (one check per re-plan and
    # estimate); otherwise the model's own index, checked.
    if isinstance(plan, Plan) and plan.index is not None and index_is_current(model, plan.index):
        index = plan.index
    else:
        index = index_model(model)
    notes: list[str] = []
    loaded_quant, loaded_double = loaded_quantization(model, index)
    if quant is None:
        quant_key = loaded_quant
    if double_quant is None:
        double_quant = loaded_double
    if ckpt == "auto":
        ckpt = quant_key is not None
        if ckpt:
            notes.append("gradient checkpointing on: training turns it on for 4/8-bit bases (ckpt: auto)")

    weight_dtype = resolve_weight_dtype(model, dtype, notes, index)
    e = 4 if weight_dtype == torch.float32 else 2
    if quant_key is not None:
        e = 2  # QLoRA computes in bf16
    if plan is not None:
        _check_plan(plan, source, settings)
    if plan is None:
        if is_peft_model(model) and not settings:
            plan = _plan_of_adapted(model)
        else:
            plan = make_plan(model, **settings)
            if not settings:
                shown = ", ".join(plan.target_modules[:4])
                notes.append(f"no adapter given: estimated for r={plan.spec.r} on {shown}")
    d = model_dims(model, index)
    tokens = seq * batch
    d, moe_bytes = _moe_terms(model, index, plan, d, tokens, e, weight_dtype, ckpt, notes)
    weights, constants = _weights_bytes(model, weight_dtype, quant_key, index, bool(double_quant))
    lora_params = plan.adapter_params
    save_params = plan.trainable_params - plan.adapter_params
    adapter = lora_params * 4 + save_params * e
    grads = lora_params * 4 + save_params * e
    optimizer = _optimizer_bytes(optim_key, plan.trainable_params)

    lora_in, dropout_in = _lora_inputs(plan, d)
    per_layer = _layer_activations(
        d, tokens, seq, e, "sdpa" if attention == "flash" else attention, lora_in, dropout_in
    )
    media = _media_activations(
        model,
        index,
        d,
        plan,
        seq,
        batch,
        e,
        ckpt,
        "sdpa" if attention == "flash" else attention,
        audio_seconds,
    )
    if given_seconds and not _reads_raw_audio(model):
        notes.append(
            f"audio_seconds {audio_seconds:g} is not used: "
            + (
                "this model has no audio input"
                if not _hears(model)
                else "this model's audio encoder always reads a fixed 30 s window"
            )
        )
    positions = ""
    if media is not None:
        activations, per_layer, media_notes, positions = media
        notes.extend(media_notes)
    elif ckpt == "offload":
        # The layer inputs wait in host memory; on the device: the layer being recomputed and its input.
        activations = e * d["hidden"] * tokens + per_layer
        notes.append("gradient checkpointing with the checkpoints offloaded to host memory (ckpt: offload)")
    elif ckpt:
        # Non-reentrant checkpointing keeps each layer's input (e·h per token) and recomputes one layer at a time.
        activations = d["layers"] * e * d["hidden"] * tokens + per_layer
    else:
        activations = d["layers"] * per_layer
    if media is not None:
        activations = int(activations * calibration.activations) + moe_bytes
    else:
        activations = (
            int(activations * calibration.activations) + e * d["hidden"] * tokens * 2 + moe_bytes
        )  # embeddings out, final norm
    task = plan.task_type
    from .train.engine import use_liger  # what the training engine decides, decided by the same function

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    liger = task == "CAUSAL_LM" and use_liger(validate_one("kernels", kernels), model, device)
    if (
        chunked_loss is None
    ):  # what the training engine does: chunked on CUDA for the architectures it supports
        from .loss import CHUNKED_LOSS_MODEL_TYPES

        chunked_loss = (
            torch.cuda.is_available() and task == "CAUSAL_LM" and d["model_type"] in CHUNKED_LOSS_MODEL_TYPES
        )
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM") or (task is None and index.task.output_embeddings):
        if liger:
            # Liger's fused linear cross-entropy makes the logits of a chunk of tokens at a time, the chunk sized so
            # that it holds about as many logits as the hidden states hold values: tokens / ceil(vocab / hidden),
            # rounded up to a power of two.
            share = max(1, -(-tokens // -(-d["vocab"] // d["hidden"])))
            logit_tokens = min(tokens, 1 << (share - 1).bit_length())
            notes.append(
                "Liger's fused kernels (kernels: auto/liger): the LM loss never holds all the logits"
            )
        else:
            # Chunked loss (core/loss.py): one chunk of 4096 tokens has logits at a time (forward or recompute).
            logit_tokens = min(tokens, 4096) if chunked_loss else tokens
        logits = int(logit_tokens * d["vocab"] * e * calibration.logits_copies)
        if task == "SEQ_2_SEQ_LM":
            logits //= 2  # decoder side only (targets are typically shorter than inputs)
    else:
        logits = 0

    name, capacity = _gpu()
    breakdown = {
        "weights": weights,
        "quant_constants": constants,
        "adapter": adapter,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
        "overhead": calibration.overhead_bytes,
        "cuda_context": calibration.cuda_context_bytes,
    }
    # only a model that generates keeps keys and values between steps (an encoder runs once over its input)
    generates = index.task.output_embeddings is not None or index.task.kind in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
    kv_cache = 2 * d["layers"] * tokens * d["kv_heads"] * d["head_dim"] * e if generates else 0
    inference = {
        "weights": weights,
        "quant_constants": constants,
        "adapter": adapter,
        **({"kv_cache": kv_cache} if generates else {}),
        "activations": int(per_layer // max(1, seq) * 2)
        + e * d["hidden"] * tokens,  # prefill, one layer live
        "logits": batch * d["vocab"] * 4,
        "overhead": calibration.overhead_bytes,
        "cuda_context": calibration.cuda_context_bytes,
    }
    if capacity is not None and sum(breakdown.values()) > capacity:
        notes.append(_advice(ckpt, quant_key, batch))
    return MemoryEstimate(
        breakdown=breakdown,
        inference=inference,
        seq=seq,
        batch=batch,
        ckpt=bool(ckpt),
        offload=ckpt == "offload",
        positions=positions,
        optim=optim_key,
        dtype=str(weight_dtype).replace("torch.", ""),
        quant=quant_key,
        trainable_params=plan.trainable_params,
        total_params=plan.total_params,
        gpu_name=name,
        gpu_capacity_bytes=capacity,
        notes=tuple(notes),
        dims=d,
    )


def _advice(ckpt: bool, quant: str | None, batch: int) -> str:
    tips = []
    if not ckpt:
        tips.append("ckpt: true (gradient checkpointing)")
    if batch > 1:
        tips.append(f"a smaller batch (batch: {max(1, batch // 2)} with grad_accum: 2)")
    if quant is None:
        tips.append("a 4-bit base (%lora base VAR ID --4bit)")
    return (
        "does not fit this GPU; try " + ", ".join(tips)
        if tips
        else "does not fit this GPU; try a shorter seq"
    )


def _plan_of_adapted(model: nn.Module) -> Plan:
    """A plan describing the active adapter a PeftModel already holds (for its counts)."""
    active = model.active_adapter
    from .adapters.inspection import held_settings
    from .spec import make_spec

    spec = make_spec(**held_settings(model, active))
    the_plan = make_plan(model, spec, name=active)
    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    return replace(the_plan, trainable_params=trainable)


def _check_plan(plan: Any, source: Any, settings: dict) -> None:
    if not isinstance(plan, Plan):
        raise UsageError(
            f"`plan` must be a plan from jupyter_lora.plan(model, ...), got {type(plan).__name__} ({plan!r:.40})."
        )
    if settings:
        raise UsageError(
            f"Give either `plan` or adapter settings ({', '.join(settings)}), not both: the plan already says what "
            "is injected. Make a new plan with those settings instead."
        )
    base = plan.base_ref() if plan.base_ref is not None else None
    if isinstance(source, nn.Module) and base is not None and base is not base_model_of(source):
        raise UsageError(
            "`plan` was made for another model; make it from this one: jupyter_lora.plan(model, ...)."
        )
