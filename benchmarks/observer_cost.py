"""What the progress display costs a training step: µs per step event for the widget and the text fallback,
without a redraw (the usual path) and with one (at most 5 per second), and the share of a step that is.

    python benchmarks/observer_cost.py [--step-ms 250]

``--step-ms``: a training step's duration to compare with (default 250 ms, bs 8 × 1024 on the anchor GPU model).
"""

from __future__ import annotations

import argparse

from jupyter_lora.widgets.progress import measure_observer_cost


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
