"""What the progress display costs a training step: µs per step event for the widget and the text fallback,
without a redraw (the usual path) and with one (at most 5 per second), and the share of a step that is.

    python benchmarks/observer_cost.py [--step-ms 250]

``--step-ms``: a training step's duration to compare with (default 250 ms, bs 8 × 1024 on the anchor GPU model).
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import statistics
import time

from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.events import TrainingEvent
from jupyter_lora.widgets.progress import ProgressWidget, TextProgress


def _synthetic_step(step: int, total: int) -> TrainingEvent:
    loss = 2.0 * math.exp(-step / 300) + 0.3 + 0.05 * math.sin(step)
    data = {
        "loss": loss,
        "lr": 2e-4 * (1 - step / total),
        "tokens": 4096,
        "tokens_per_s": 12_000.0,
        "elapsed": step * 0.3,
        "eta": (total - step) * 0.3,
        "memory_allocated": 3 << 30,
        "memory_peak": 4 << 30,
        "grad_norm": 1.0,
    }
    return TrainingEvent("step", step, total, step / total, step * 0.3, data)


def measure_observer_cost(n_steps: int = 2000, kind: str = "widget", repeat: int = 3) -> dict[str, float]:
    """What one ``observer(event)`` call costs the training thread, in µs per step event.

    ``record_us``: record plus clock check, no redraw (``min_interval=inf``), the usual path. ``flush_us``:
    every event redraws (``min_interval=0``), averaged while the history grows to ``n_steps``. ``flush_last_us``
    is the same for the last 10% of events, with the longest history. ``kind``: "widget" (``ProgressWidget``,
    no front end attached, so comm messages are built but not sent) or "text" (``TextProgress`` printing
    terminal lines to a buffer). Best of ``repeat`` runs; the cyclic GC is paused while timing, as in ``timeit``.
    A redraw at most 5 times a second costs at most 5·flush_us per second.
    """
    if kind not in ("widget", "text"):
        raise UsageError(f"`kind` must be 'widget' or 'text', got {kind!r}.")
    events = [_synthetic_step(i, n_steps) for i in range(1, n_steps + 1)]
    start = TrainingEvent("start", 0, n_steps, 0.0, 0.0, {"total_steps": n_steps})

    def make(interval: float) -> ProgressWidget | TextProgress:
        if kind == "widget":
            return ProgressWidget(stop=lambda: None, min_interval=interval)
        return TextProgress(output="terminal", min_interval=interval, file=io.StringIO())

    def run(interval: float) -> list[float]:
        observer = make(interval)
        observer(start)
        times = []
        clock = time.perf_counter
        enabled = gc.isenabled()
        gc.disable()
        try:
            for event in events:
                t0 = clock()
                observer(event)
                times.append(clock() - t0)
        finally:
            if enabled:
                gc.enable()
        if observer.observer_error:  # pragma: no cover - would make the numbers meaningless
            raise RuntimeError(observer.observer_error)
        return times

    record_runs = [run(math.inf) for _ in range(repeat)]
    flush_runs = [run(0.0) for _ in range(repeat)]
    tail = max(1, n_steps // 10)
    return {
        "n_steps": float(n_steps),
        "record_us": min(statistics.fmean(r) for r in record_runs) * 1e6,
        "record_median_us": min(statistics.median(r) for r in record_runs) * 1e6,
        "flush_us": min(statistics.fmean(r) for r in flush_runs) * 1e6,
        "flush_last_us": min(statistics.fmean(r[-tail:]) for r in flush_runs) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=250.0)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'observer':<10}{'record µs':>11}{'redraw µs':>11}{'worst share of a step':>24}")
    for kind in ("widget", "text"):
        cost = measure_observer_cost(args.steps, kind=kind)
        # Per step: one record; redraws at most 5 per second, i.e. 5·redraw µs of every second of training.
        per_second = cost["record_us"] * (1000 / args.step_ms) + 5 * cost["flush_last_us"]
        print(
            f"{kind:<10}{cost['record_us']:>11.1f}{cost['flush_last_us']:>11.0f}{100 * per_second / 1e6:>23.2f}%"
        )
    print("goal: ≤ 2% of step time")


if __name__ == "__main__":
    main()
