"""Several adapters from one base model at once: every prompt through every adapter named (and the base model, as
``"base"``) in ONE batch, with PEFT's mixed-batch inference (``generate(..., adapter_names=[...])``: each row of
the batch goes through its own adapter's LoRA weights, ``"__base__"`` rows through none).

Prompts are formatted as ``compare`` and the chat format them: one user message through the tokenizer's chat
template when it has one, else the text as it is; greedy unless ``temperature`` > 0. PEFT refuses to mix DoRA
adapters, adapters on fused expert weights or on ``nn.MultiheadAttention``, merged adapters and models in training
mode; those are refused here first, in one line, before anything runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..settings import validate_one
from .adapters.guards import require_adapters
from .adapters.peft_facts import active_names, adapter_layers
from .chat import _context_limit, _find_tokenizer, _seeded
from .compare import input_device
from .data import find_tokenizer, vocab_size_of
from .data.tokenize import check_token_ids, has_chat_template, pad_token_id
from .errors import NoAdapterError, UsageError, did_you_mean
from .modelinfo import base_model_of, detect_task, require_module

__all__ = ["BASE", "Generation", "Generations", "generate"]

BASE = "base"  # the name a caller gives the model without any adapter
_PEFT_BASE = "__base__"  # PEFT's name for it in adapter_names
_GENERATION_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


@dataclass(frozen=True)
class Generation:
    """One prompt through one adapter (``"base"``: no adapter): the decoded reply and how many tokens it took
    (up to and including the end-of-sequence token)."""

    prompt: str
    adapter: str
    text: str
    new_tokens: int


@dataclass(frozen=True)
class Generations:
    """Every prompt through every adapter, made in one mixed batch: ``rows`` prompt by prompt, adapters in the
    order asked. ``seconds``: the time ``generate`` took (tokenizing, generating, decoding)."""

    prompts: tuple[str, ...]
    adapters: tuple[str, ...]
    rows: tuple[Generation, ...]
    seconds: float = 0.0

    def text(self, prompt: str | int, adapter: str) -> str:
        """The reply to ``prompt`` (the text, or its index) by ``adapter``."""
        i = prompt if isinstance(prompt, int) else self.prompts.index(prompt)
        return self.rows[i * len(self.adapters) + self.adapters.index(adapter)].text

    @property
    def new_tokens(self) -> int:
        """Tokens generated in all (every row's ``new_tokens``)."""
        return sum(r.new_tokens for r in self.rows)

    def to_pandas(self) -> Any:
        """One row per prompt × adapter (prompt, adapter, text, new_tokens) as a pandas DataFrame."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("`to_pandas` needs pandas: pip install pandas.") from None
        return pd.DataFrame(
            [r.__dict__ for r in self.rows], columns=["prompt", "adapter", "text", "new_tokens"]
        )

    def __iter__(self) -> Iterator[Generation]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (
            f"Generations({len(self.prompts)} prompt(s) × adapters {list(self.adapters)}: "
            f"{self.new_tokens} new tokens in {self.seconds:.2f} s)"
        )


def _prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UsageError(f"`prompts` must be a text or a non-empty list of texts, got {prompts!r}.")
    for k, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise UsageError(f"`prompts[{k}]` must be non-empty text, got {p!r}.")
    return list(prompts)


def _adapters(peft_model: nn.Module, adapters: Any) -> list[str]:
    """The adapter names asked for, checked (``"base"`` included), each once, in the order given."""
    names = list(peft_model.peft_config)
    if adapters is None:
        return [active_names(peft_model)[0]]
    if isinstance(adapters, str):
        adapters = [a.strip() for a in adapters.split(",") if a.strip()]
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise UsageError(
            f"`adapters` must be a list of adapter names (and 'base'), got {adapters!r}. Adapters here: "
            f"{', '.join(repr(n) for n in names)}."
        )
    out: list[str] = []
    for a in adapters:
        if not isinstance(a, str) or (a != BASE and a not in names):
            raise UsageError(
                f"`adapters`: {a!r} is no adapter of this model.{did_you_mean(str(a), [*names, BASE])} Adapters: "
                f"{', '.join(repr(n) for n in names)}, and 'base' for the model without any."
            )
        if a not in out:
            out.append(a)
    return out


def _check_mixable(peft_model: nn.Module, adapters: Sequence[str]) -> None:
    """Refuse what PEFT's mixed-batch inference cannot do, in our words, before anything runs."""
    merged = sorted(
        {n for _, m in adapter_layers(peft_model, peft_model.peft_config) for n in m.merged_adapters}
    )
    if merged:
        raise UsageError(
            f"Cannot generate from several adapters: {', '.join(repr(n) for n in merged)} is merged into the base "
            "weights, so every row would see it. Unmerge it first (model.unmerge_adapter()), or generate from "
            "the merged model alone with compare or chat."
        )
    asked = [a for a in adapters if a != BASE]
    if asked and any(getattr(m, "disable_adapters", False) for _, m in adapter_layers(peft_model, asked)):
        raise UsageError(
            f"The adapters are switched off (disable), so {', '.join(repr(a) for a in asked)} would answer as the "
            "base model. Switch them on first: jupyter_lora.enable(model) or %lora enable model."
        )
    for name in asked:
        config = peft_model.peft_config[name]
        kind = str(getattr(config.peft_type, "value", config.peft_type))
        if kind != "LORA":
            raise UsageError(
                f"`adapters`: {name!r} is a {kind} adapter; only LoRA adapters can share a batch. Generate from it "
                "alone (jupyter_lora.use(model, name), then compare or chat)."
            )
        if getattr(config, "use_dora", False):
            raise UsageError(
                f"`adapters`: {name!r} is a DoRA adapter, and PEFT cannot run DoRA adapters in a mixed batch. Ask "
                "for the others, or merge the DoRA adapter into a copy of the model and generate from that."
            )
        for path, layer in adapter_layers(peft_model, [name]):
            if type(layer).__name__ in ("ParamWrapper", "MultiheadAttention"):
                what = (
                    "fused expert weights" if type(layer).__name__ == "ParamWrapper" else type(layer).__name__
                )
                raise UsageError(
                    f"`adapters`: {name!r} adapts {what} (`{path}`), which PEFT cannot run in a mixed batch. Generate "
                    "from it alone: jupyter_lora.use(model, name), then compare or chat."
                )


def _encode(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt's token ids: one user message through the chat template when the tokenizer has one (the
    template writes its own special tokens), else the text with the tokenizer's special tokens."""
    if has_chat_template(tokenizer):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def _pad(ids: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one length: left for a decoder (new tokens follow every prompt's last token), right for an encoder.
    Done here rather than by the tokenizer, which refuses to pad without a pad token and is left untouched."""
    width = max(len(x) for x in ids)
    rows, masks = [], []
    for x in ids:
        fill = [pad] * (width - len(x))
        rows.append(fill + x if left else x + fill)
        masks.append([0] * len(fill) + [1] * len(x) if left else [1] * len(x) + [0] * len(fill))
    return torch.tensor(rows), torch.tensor(masks)


def _count(ids: list[int], eos: set[int]) -> int:
    for k, token in enumerate(ids):
        if token in eos:
            return k + 1
    return len(ids)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    found = getattr(getattr(base_model_of(model), "generation_config", None), "eos_token_id", None)
    ids = set(found if isinstance(found, (list, tuple)) else [found] if found is not None else [])
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(
    model: nn.Module,
    prompts: str | Sequence[str],
    adapters: Sequence[str] | str | None = None,
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> Generations:
    """Every prompt through every adapter in ``adapters`` (names the model holds, and ``"base"`` for the model
    without any adapter; default: the active adapter), as ONE batch (PEFT's mixed-batch inference).

    ``prompts``: a text or a list of texts; with a tokenizer that has a chat template, each is one user message.
    ``tokenizer``: default, the one saved beside the model. Greedy unless ``temperature`` > 0 (then ``top_p`` and
    ``seed`` apply); other keyword arguments go to transformers' ``generate`` (e.g. ``min_new_tokens``). Returns
    ``Generations`` (a prompt × adapter table in a notebook; ``.text(prompt, adapter)``, ``.to_pandas()``).
    The model is not changed (its train/eval flags are put back)."""
    require_module(model)
    task = detect_task(model)  # what the model is for comes first: a classifier holds adapters too
    if task.task_type not in _GENERATION_TASKS or task.main_input != "input_ids":
        raise UsageError(
            f"`generate` makes text with causal or seq2seq LMs; this model "
            f"({type(base_model_of(model)).__name__}) is for {task.task_type or task.kind or 'an unknown task'}. "
            "For a classifier, compare(model, text) shows class probabilities with and without the adapter."
        )
    try:
        peft_model = require_adapters(model, "generate")
    except NoAdapterError:
        raise NoAdapterError(
            "`generate` runs the prompts through adapters the model holds, and this model holds none (a merged "
            "model has its adapter in its weights: compare or chat show it). Load or inject adapters first: "
            "model = jupyter_lora.load(model, 'adapters/a', name='a')."
        ) from None
    prompts = _prompts(prompts)
    names = _adapters(peft_model, adapters)
    _check_mixable(peft_model, names)
    max_new_tokens = validate_one("max_new_tokens", max_new_tokens)
    temperature = validate_one("temperature", temperature)
    top_p = validate_one("top_p", top_p)
    if seed is not None:
        seed = validate_one("seed", seed)
    if tokenizer is None:
        tokenizer = find_tokenizer(peft_model)
        if tokenizer is None:
            raise UsageError(
                "`tokenizer` is needed to turn the prompts into tokens and none is saved beside the model: pass "
                'generate(model, prompts, tokenizer=tok) or %lora generate model --tokenizer tok "...".'
            )
    tokenizer = _find_tokenizer(peft_model, tokenizer)  # a tokenizer, or a one-line error
    start = time.perf_counter()

    encoded = _encode(tokenizer, prompts)
    vocab = vocab_size_of(peft_model)
    if vocab is not None:
        check_token_ids([{"input_ids": x} for x in encoded], tokenizer, vocab, padding=True)
    seq2seq = task.task_type == "SEQ_2_SEQ_LM"
    limit = _context_limit(peft_model)
    longest = max(len(x) for x in encoded)
    if limit is not None and longest + max_new_tokens > limit:
        raise UsageError(
            f"The longest prompt takes {longest} tokens and `max_new_tokens`={max_new_tokens} more: past this "
            f"model's context of {limit} tokens. Shorten the prompt or lower max_new_tokens."
        )
    pad = pad_token_id(tokenizer)
    ids, mask = _pad(encoded, pad, left=not seq2seq)
    k = len(names)
    device = input_device(peft_model)
    # row i*k + j: prompt i through adapter j
    inputs = {
        "input_ids": ids.repeat_interleave(k, 0).to(device),
        "attention_mask": mask.repeat_interleave(k, 0).to(device),
    }
    row_adapters = [_PEFT_BASE if a == BASE else a for _ in prompts for a in names]
    kwargs: dict[str, Any] = dict(
        inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, adapter_names=row_adapters
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:  # greedy: the model's own sampling defaults (generation_config) play no part
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs.update(generate_kwargs)

    modes = [(m, m.training) for m in peft_model.modules()]
    peft_model.eval()  # PEFT refuses adapter_names in training mode
    try:
        with _seeded(seed, device) if seed is not None else contextlib.nullcontext(), torch.no_grad():
            out = peft_model.generate(**kwargs)
    finally:
        for module, mode in modes:
            module.training = mode

    new = out[:, 1:] if seq2seq else out[:, ids.shape[1] :]  # a decoder starts from its start token
    eos = _eos_ids(peft_model, tokenizer)
    rows = []
    for r, row in enumerate(new.tolist()):
        n = _count(row, eos)
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        rows.append(Generation(prompts[r // k], names[r % k], text, n))
    return Generations(tuple(prompts), tuple(names), tuple(rows), time.perf_counter() - start)
