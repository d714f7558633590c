"""Panel latency on a Llama-2-70B-shaped meta model (80 layers, 560 adaptable modules): from a slider change
(rank, alpha, dropout, variant) or a new target spec to updated numbers — the Python side of the panel, measured
around the trait change that the front end sends. Goal: ≤ 50 ms.

    python benchmarks/panel_latency.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from jupyter_lora.testing import llama_config
    from jupyter_lora.widgets.panel import Panel

    config = llama_config("llama-2-70b")
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    start = time.perf_counter()
    panel = Panel(model, targets="all-linear")
    build = time.perf_counter() - start
    print(f"panel built in {1000 * build:.0f} ms ({len(panel.tree.nodes)} tree nodes, "
          f"{len(panel.tree.selected)} targets selected)")  # fmt: skip

    def measure(label, changes):
        times = []
        for change in changes:
            gc.collect()
            t0 = time.perf_counter()
            change()
            times.append(1000 * (time.perf_counter() - t0))
        print(f"{label:<32}{statistics.median(times):>10.1f}{max(times):>10.1f}")
        return times

    print(f"{'change':<32}{'median ms':>10}{'max ms':>10}")
    ranks = [4, 8, 16, 32, 64, 128]
    results = []
    results += measure(
        "rank slider", [lambda v=ranks[i % 6]: setattr(panel.r, "value", v) for i in range(args.repeats)]
    )
    results += measure("dropout slider", [lambda v=i: setattr(panel.dropout, "value", (v % 10) / 100) for i in range(args.repeats)])  # fmt: skip
    variants = ["dora", "rslora", "lora"]
    results += measure("variant", [lambda v=variants[i % 3]: setattr(panel.variant, "value", v) for i in range(args.repeats)])  # fmt: skip
    specs = ["attention", "mlp", "qv", "all-linear", "q_proj, v_proj", "re:.*\\.o_proj"]
    results += measure("targets (new spec)", [lambda v=specs[i % 6]: setattr(panel.tree, "targets", v) for i in range(args.repeats)])  # fmt: skip
    results += measure("seq (memory bar)", [lambda v=i: setattr(panel.seq, "value", str(512 + 64 * v)) for i in range(args.repeats)])  # fmt: skip
    worst = max(results)
    print(f"worst {worst:.1f} ms, median {statistics.median(results):.1f} ms — goal ≤ 50 ms: "
          f"{'met' if worst <= 50 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
