"""The prepared data a training run consumes: tokenized train and eval examples, the held-out eval split, and
deterministic, resumable batches (padded, or packed into one row).

* The held-out eval split is a ``torch.randperm`` of the examples seeded by ``seed``; batch order in epoch ``e``
  is ``torch.randperm`` seeded by ``seed * 1000 + e``. Same inputs, same batches: a resumed run skips ``start``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ...settings import validate_one
from ..errors import UsageError, did_you_mean
from .formats import IGNORE_INDEX

__all__ = ["PreparedData", "eval_count", "positive_setting", "split_eval"]


@dataclass
class PreparedData:
    """Tokenized train (and eval) examples with the collator and the batch order a training run uses.

    CAUSAL_LM examples are ``{"input_ids", "labels"}`` (labels = input_ids with the prompt set to -100);
    SEQ_CLS examples are ``{"input_ids", "label"}``. ``truncated`` counts the examples (train and eval) cut to
    ``seq``; ``dropped`` those skipped because nothing was left to learn. With ``packing`` each batch is one row
    without padding (``position_ids`` restart at 0 per example); pass ``forward_kwargs`` to the model with it.
    """

    task: str
    train: list[dict] = field(repr=False)
    eval: list[dict] | None = field(repr=False)
    label_names: tuple[str, ...]
    train_tokens: int
    truncated: int
    packing: bool = False
    pad_token_id: int = 0
    dropped: int = 0
    seq: int | None = None
    # Records with images or audio: the function that turns a list of examples into one batch of tensors (the
    # processor's padding or transformers' collators), and what one unit of throughput is ("tokens", "images",
    # "seconds of audio"); ``units(batch)`` counts them.
    collator: Any = field(default=None, repr=False, compare=False)
    unit: str = "tokens"
    # How much the train split holds in ``unit``s when they are not tokens: images, or seconds of audio.
    train_units: float = 0.0
    _flattener: Any = field(default=None, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        n_eval = len(self.eval) if self.eval else 0
        parts = [
            f"task={self.task}",
            f"train={len(self.train)} examples / {self._amount()}",
            f"eval={n_eval}",
        ]
        if self.label_names:
            parts.append(f"labels={list(self.label_names)}")
        if self.truncated:
            parts.append(f"truncated={self.truncated}")
        if self.dropped:
            parts.append(f"dropped={self.dropped}")
        if self.packing:
            parts.append("packing=True")
        return f"PreparedData({', '.join(parts)})"

    def _amount(self) -> str:
        if self.unit == "tokens":
            return f"{self.train_tokens:,} tokens"
        if self.unit == "images":
            return f"{int(self.train_units):,} images"
        return f"{self.train_units:,.1f} {self.unit}"

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``model(**batch, **forward_kwargs)``: ``use_cache=False``.

        Training never needs the KV cache, and a packed batch needs it off: transformers only builds the
        block-diagonal mask from ``position_ids`` when ``attention_mask`` and ``past_key_values`` are both None,
        and with ``config.use_cache=True`` (the default) the model creates an empty cache itself — then the
        examples in a packed row attend to each other and the loss is wrong (masking_utils
        ``_preprocess_mask_arguments`` / ``find_packed_sequence_indices``).
        """
        return {"use_cache": False}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Tensors for one batch: padded to the longest example (pad id, attention_mask 0, labels -100), or for
        a packed causal LM batch one row of ``input_ids``/``labels``/``position_ids`` with no padding."""
        if not examples:
            raise UsageError("`examples` is empty: collate needs at least one example.")
        if self.collator is not None:
            return self.collator(examples)
        if self.task == "SEQ_CLS":
            out = self._pad(examples, with_labels=False)
            out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
            return out
        if self.packing:
            return self._flatten(examples)
        return self._pad(examples, with_labels=True)

    def units(self, batch: dict[str, Any]) -> float:
        """How much of the data one batch holds, in ``unit``s: its real (unpadded) tokens for text, images, or
        seconds of audio (not a whole number)."""
        if self.collator is not None and hasattr(self.collator, "units"):
            return self.collator.units(batch)
        mask = batch.get("attention_mask")
        if mask is not None:
            return int(mask.sum())
        ids = batch.get("input_ids")
        return int(ids.numel()) if ids is not None else 0

    def _pad(self, examples: list[dict], with_labels: bool) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = labels
        return out

    def _flatten(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # transformers' DataCollatorWithFlattening does exactly what packing needs (checked in the tests): one
        # [1, total] row, position_ids restarting at 0 per example, and the first label of every example set to
        # -100 so no token is predicted across an example boundary. No attention_mask: with one, transformers
        # would not derive the per-example (block-diagonal) mask from position_ids.
        if self._flattener is None:
            from transformers import DataCollatorWithFlattening

            self._flattener = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        features = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples]
        return dict(self._flattener(features, return_tensors="pt"))

    def _split(self, split: str) -> list[dict]:
        if split == "train":
            return self.train
        if split == "eval":
            return self.eval or []
        raise UsageError(
            f"`split` must be 'train' or 'eval'; got {split!r}.{did_you_mean(split, ['train', 'eval'])}"
        )

    def num_batches(self, split: str, batch: int) -> int:
        """Number of batches of ``batch`` examples in ``split`` ("train"/"eval"); the last partial one counts."""
        batch = positive_setting("batch", batch)
        return math.ceil(len(self._split(split)) / batch)

    def batches(
        self,
        split: str,
        batch: int,
        epoch: int = 0,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Deterministic batches of ``split`` ("train"/"eval") for ``epoch``.

        Train order is ``torch.randperm`` with a generator seeded by ``seed * 1000 + epoch`` (eval, and
        ``shuffle=False``, keep the stored order). The first ``start`` batches are skipped (resuming a run);
        the last partial batch is kept.
        """
        examples = self._split(split)
        batch = positive_setting("batch", batch)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise UsageError(f"`start` must be a batch index >= 0; got {start!r}.")
        if split == "train" and shuffle:
            generator = torch.Generator().manual_seed(int(seed) * 1000 + int(epoch))
            order = torch.randperm(len(examples), generator=generator).tolist()
        else:
            order = list(range(len(examples)))
        for begin in range(start * batch, len(order), batch):
            yield self.collate([examples[i] for i in order[begin : begin + batch]])


def positive_setting(name: str, value: Any) -> int:
    """``value`` of the setting ``name`` ("batch", "seq"), checked as ``settings`` declares it; a UsageError
    says it must be a positive whole number."""
    try:
        return validate_one(name, value)
    except UsageError:
        raise UsageError(f"`{name}` must be a positive whole number; got {value!r}.") from None


def eval_count(eval: Any, n: int) -> int:
    """How many of ``n`` examples to hold out.

    None/"auto"/True: ``min(500, n // 10)`` when ``n >= 100``, else 0. A float f in (0, 1): ``max(1, round(f * n))``.
    An int k: k. 0, 0.0, False, "none": 0.
    """
    if isinstance(eval, str):
        key = eval.strip().lower()
        if key == "auto":
            eval = None
        elif key in ("none", "no", "off", "false", "0"):
            eval = 0
        else:
            raise UsageError(
                f"`eval` must be 'auto', a fraction in (0, 1), a number of examples or 0; got {eval!r}."
            )
    if eval is None or eval is True:
        return min(500, n // 10) if n >= 100 else 0
    if eval is False:
        return 0
    if isinstance(eval, float):
        if not 0 <= eval < 1:
            raise UsageError(
                f"`eval`={eval!r}: a fraction must be in [0, 1), e.g. eval=0.1; pass an int for a number of examples."
            )
        count = max(1, round(eval * n)) if eval > 0 else 0
    elif isinstance(eval, int):
        if eval < 0:
            raise UsageError(f"`eval`={eval!r}: the number of eval examples cannot be negative.")
        count = eval
    else:
        raise UsageError(
            f"`eval` must be 'auto', a fraction in (0, 1), a number of examples or 0; got {type(eval).__name__}."
        )
    if count >= n:
        raise UsageError(
            f"`eval`={eval!r} holds out {count} of the {n} examples and leaves none for training: pass a smaller "
            "eval, or eval_data= with a separate eval set."
        )
    return count


def split_eval(examples: list, n_eval: int, seed: int) -> tuple[list, list | None]:
    """Hold out ``n_eval`` examples chosen by ``torch.randperm`` seeded by ``seed``; both parts keep data order."""
    if n_eval <= 0:
        return examples, None
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(int(seed))).tolist()
    held = set(perm[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]
