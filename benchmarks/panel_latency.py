"""Panel latency on Llama-shaped meta-device models (7B, 70B and 405B shapes, no weights): from a change of the
rank slider, the alpha slider or the target spec to updated numbers — the Python side of the panel, timed around
the trait change the front end sends (the trait's observer re-plans and re-estimates, as in a notebook).

Every measured change is new: ranks and alphas are drawn without repeats, and each target spec is one the model has
not resolved before. The garbage collector runs as it would in a kernel (no collection forced before a change:
that leaves every change to start on cold caches, slower than any change a user makes). Each change is timed in
wall-clock time (what the user waits) and in the CPU time of the thread (the work done, less sensitive to other
processes on a shared machine); the load average is printed with the results. Goal: rank and alpha changes at
p95 ≤ 10 ms at every model size.

    python benchmarks/panel_latency.py [--repeats 40] [--models llama-2-7b,llama-2-70b,llama-3.1-405b]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import statistics
import time

from jupyter_lora.testing import LLAMA_SHAPES

GOAL_MS = 10.0


def meta_model(shape: str):
    import torch
    from transformers import LlamaForCausalLM

    from jupyter_lora.testing import llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(shape))


def percentile(times: list[float], q: float) -> float:
    """The q-th percentile, linear between the two nearest ranks."""
    ordered = sorted(times)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(changes) -> tuple[list[float], list[float]]:
    """(wall-clock ms, thread CPU ms) of each change."""
    wall, cpu = [], []
    for change in changes:
        start, start_cpu = time.perf_counter(), time.thread_time()
        change()
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.thread_time() - start_cpu))
    return wall, cpu


def target_specs(n: int, layers: int) -> list[str]:
    """``n`` target specs, each naming modules the way a user types them, none of them seen before."""
    forms = [
        "attention, model.layers.{k}.mlp.down_proj",
        "mlp, model.layers.{k}.self_attn.o_proj",
        "q_proj, v_proj, model.layers.{k}.mlp.gate_proj",
        "re:model\\.layers\\.{k}\\..*_proj",
        "k_proj, o_proj, layers.{k}.mlp.*",
        "all-linear, layers.{k}.self_attn.q_proj",
    ]
    return [forms[i % len(forms)].format(k=(7 * i) % layers) for i in range(n)]


def bench(shape: str, repeats: int, seed: int) -> dict:
    from jupyter_lora.widgets.panel import Panel

    rng = random.Random(seed)
    model = meta_model(shape)
    start = time.perf_counter()
    panel = Panel(model, targets="all-linear")
    build = 1000 * (time.perf_counter() - start)
    out = {"build": build, "modules": len(panel.tree.nodes), "selected": len(panel.tree.selected)}
    gc.collect()  # the garbage of building this model and of the models before, once, before any change

    ranks = rng.sample([r for r in range(1, 257) if r != panel.r.value], repeats)
    out["rank"] = measure([lambda v=v: setattr(panel.r, "value", v) for v in ranks])
    panel.alpha_lock.value = False  # alpha slider free: each alpha change is one update
    lo, hi = panel.alpha.min, panel.alpha.max
    alphas = rng.sample(
        [float(a) for a in range(int(lo) + 1, int(hi) + 1) if a != panel.alpha.value], repeats
    )
    out["alpha"] = measure([lambda v=v: setattr(panel.alpha, "value", v) for v in alphas])
    specs = target_specs(repeats, LLAMA_SHAPES[shape]["num_hidden_layers"])
    out["targets"] = measure([lambda v=v: setattr(panel.tree, "targets", v) for v in specs])
    assert panel.plan is not None and not panel.tree.error, panel.tree.error
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="changes measured per kind and model")
    parser.add_argument("--models", default=",".join(LLAMA_SHAPES), help="comma-separated model shapes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    shapes = [s.strip() for s in args.models.split(",") if s.strip()]
    from jupyter_lora.testing import tiny_model
    from jupyter_lora.widgets.panel import Panel

    Panel(tiny_model("llama"))  # imports and first-use initialisation outside the timed build

    results = {}
    for shape in shapes:
        results[shape] = r = bench(shape, args.repeats, args.seed)
        print(
            f"{shape}: panel built in {r['build']:.0f} ms ({r['modules']} tree nodes, {r['selected']} targets)"
        )
    print()
    header = (
        f"{'model':<16}{'change':<9}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
        f"{'CPU p50':>9}{'CPU p95':>9}"
    )
    print(header)
    print("-" * len(header))
    met = True
    for shape, r in results.items():
        for kind in ("rank", "alpha", "targets"):
            wall, cpu = r[kind]
            p95 = percentile(wall, 95)
            if kind != "targets":
                met &= p95 <= GOAL_MS
            print(
                f"{shape:<16}{kind:<9}{len(wall):>4}{statistics.median(wall):>9.2f}{p95:>9.2f}{max(wall):>9.2f}"
                f"{statistics.median(cpu):>9.2f}{percentile(cpu, 95):>9.2f}"
            )
    print()
    print(
        f"rank and alpha changes p95 ≤ {GOAL_MS:.0f} ms (wall clock) at every size: {'met' if met else 'NOT met'}"
    )
    if len(shapes) > 1:
        first, last = shapes[0], shapes[-1]
        ratio = statistics.median(results[last]["rank"][0]) / statistics.median(results[first]["rank"][0])
        print(f"rank change p50, {last} / {first}: {ratio:.2f}×")
    print(
        f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
