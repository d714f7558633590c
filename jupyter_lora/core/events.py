"""Training events: what the engine reports, for any number of observers (progress widget, text fallback, logs).

The engine never touches a UI; observers are plain callables ``observer(event)``. An observer that raises is
reported once (a warning) and then skipped, so a broken display never stops a training run.

Kinds and their ``data``:

========== =============================================================================================
start      total_steps, examples, eval_examples, trainable_params, task, config (dict), device, resumed_from
           (checkpoint path or None); a resumed run also history and evals: the records before the checkpoint
           ({step, loss, lr, tokens, epoch, time} and {step, eval_loss, epoch, accuracy?})
step       loss, lr, tokens (this step), tokens_per_s, elapsed, eta, memory_allocated, memory_peak (bytes;
           None on CPU), grad_norm (None unless clipping)
eval       eval_loss, accuracy (classification only), best_eval_loss, improved (bool)
sample     samples: list of {"prompt": str, "text": str}
checkpoint path, reason (every | stop | end | oom | best)
oom        message, advice, checkpoint (path or None)
stop       reason (user | early_stop), checkpoint
end        steps, final_loss, best_eval_loss, elapsed, tokens, tokens_per_s, checkpoint, state
error      message, exception type name
========== =============================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_KINDS", "TrainingEvent"]

EVENT_KINDS = ("start", "step", "eval", "sample", "checkpoint", "oom", "stop", "end", "error")


@dataclass(frozen=True)
class TrainingEvent:
    """One thing that happened in a training run. ``step`` counts optimizer steps done so far."""

    kind: str
    step: int
    total_steps: int
    epoch: float
    time: float  # seconds since the run started
    data: Mapping[str, Any] = field(default_factory=dict)
