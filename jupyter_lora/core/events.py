"""Training events: what the engine reports, for any number of observers (progress widget, text fallback, logs).

The engine never touches a UI; observers are plain callables ``observer(event)``. An observer that raises is
reported once (a warning) and then skipped, so a broken display never stops a training run.

Kinds and their ``data``:

========== =============================================================================================
start      total_steps, examples, eval_examples, trainable_params, task, unit (what `tokens` counts: tokens, images
           or seconds of audio), config (dict), device, resumed_from
           (checkpoint path or None); the device figures (below) at the start; a resumed run also history and
           evals: the records before the checkpoint ({step, loss, lr, tokens, epoch, time} and
           {step, eval_loss, epoch, accuracy?})
step       loss, lr, tokens (this step), tokens_per_s, elapsed, eta, grad_norm (None unless clipping), and the
           device figures
eval       eval_loss, accuracy (classification only), best_eval_loss, improved (bool)
sample     samples: list of {"prompt": str, "text": str}
checkpoint path, reason: every | stop | end | oom — the last checkpoint of a run is "end" when every planned step
           was done, "stop" when the run stopped before (Stop, early stopping), "oom" after out-of-memory
oom        message, advice, checkpoint (path or None)
stop       reason (user | early_stop), checkpoint
end        steps, final_loss, best_eval_loss, elapsed, tokens, tokens_per_s, checkpoint, state (finished |
           stopped | early_stopped | oom | failed), memory_peak
error      message, exception type name
========== =============================================================================================

Device figures (``core.train.devicestats``): memory_allocated, memory_peak, memory_capacity (bytes) and
gpu_utilization (percent, None without nvidia-ml-py). All None where nothing is measured (a CPU). On a GPU they are
read on logging steps at most every 0.2 s: a step event between two readings leaves them out.
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
