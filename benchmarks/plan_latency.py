"""Latency of ``jupyter_lora.plan`` on meta-device Llama-2 models, against PEFT's own way of getting the counts.

For a Llama-2-70B-shaped and a Llama-2-7B-shaped model built on the meta device (``accelerate.init_empty_weights``,
no weights allocated) this measures, with ``time.perf_counter``:

(a) cold   - the first ``plan(model, r=16, targets="all-linear")`` on a freshly built model: module discovery
             (one walk over the model), target resolution and the counts;
(b) warm   - re-plans where only r / alpha / dropout / variant change (what a slider does): the cached module
             index and target resolution are reused;
(c) retarget - a re-plan with a targets/layers spec not seen before: a new resolution on the cached index;
(d) PEFT   - ``get_peft_model(fresh_meta_model, LoraConfig(r=16, target_modules="all-linear"))`` followed by
             ``get_nb_trainable_parameters()``, i.e. what one would otherwise run to learn the same numbers.

Each fresh model is built outside the timed region, and the cyclic garbage collector is run before and paused
during each timed call (as ``timeit`` does). It prints best / median / max per measurement, PEFT's median
divided by the warm median, whether plan's trainable/total parameter counts equal PEFT's, and whether the warm
median meets the 50 ms interactive target. ``--quick`` skips the 7B model.

    python benchmarks/plan_latency.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import statistics
import sys
import time
import warnings
from functools import partial

from jupyter_lora.testing import LLAMA_SHAPES as SHAPES

TARGET_S = 0.050  # a re-plan must keep up with a slider


def meta_model(shape: dict):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(LlamaConfig(**shape))


def timed(fn) -> tuple[float, object]:
    """Seconds ``fn()`` took, with Python's cyclic GC collected before and paused during the call (as
    ``timeit`` does): a full collection of the earlier 70B meta models costs ~0.3 s and would otherwise land
    in whichever call happens to trigger it."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    finally:
        gc.enable()


def stats(times: list[float]) -> dict[str, float]:
    return {"best": min(times), "median": statistics.median(times), "max": max(times), "n": len(times)}


def peft_counts_of(model) -> tuple[int, int]:
    """What PEFT reports: wrap with LoRA on all linear layers and count."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    return peft_model.get_nb_trainable_parameters()


def bench_model(name: str, shape: dict, repeats: int, peft_repeats: int) -> dict:
    import jupyter_lora as jl

    out: dict = {"name": name}

    # (a) cold: a fresh model per repeat, so every call walks the model.
    cold, first_plan, model = [], None, None
    for _ in range(repeats):
        model = meta_model(shape)
        t, p = timed(partial(jl.plan, model, r=16, targets="all-linear"))
        cold.append(t)
        first_plan = first_plan or p
    out["cold"] = stats(cold)
    out["plan"] = first_plan

    # (b) warm: same model, only r / alpha / dropout / variant change.
    settings = [
        dict(r=r, variant=v, alpha=a, dropout=d)
        for (r, v), (a, d) in zip(
            itertools.product((4, 8, 16, 32, 64), ("lora", "dora", "rslora")),
            itertools.cycle([(None, 0.0), (32.0, 0.05), (None, 0.1)]),
        )
    ]
    settings = settings * 2  # 30 re-plans
    warm = [timed(partial(jl.plan, model, targets="all-linear", **s))[0] for s in settings]
    out["warm"] = stats(warm)

    # (c) new targets/layers spec each time (a resolution not cached yet), discovery cached.
    layers = shape["num_hidden_layers"]
    specs = [
        dict(targets="q_proj,v_proj", layers=f"0-{k}")
        if i % 3 == 0
        else dict(targets="attention", layers=f"{k}-{layers - 1}")
        if i % 3 == 1
        else dict(targets="mlp", layers=f"0-{k}", exclude="down_proj")
        for i, k in enumerate(range(1, layers, max(1, layers // repeats)))
    ][: max(repeats, 3)]
    out["retarget"] = stats([timed(partial(jl.plan, model, r=16, **s))[0] for s in specs])
    model = None
    gc.collect()

    # (d) PEFT on a fresh meta model per repeat (built outside the timed region).
    peft_times, peft_counts = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(peft_repeats):
            fresh = meta_model(shape)
            t, peft_counts = timed(partial(peft_counts_of, fresh))
            peft_times.append(t)
            fresh = None
            gc.collect()
    out["peft"] = stats(peft_times)
    out["peft_counts"] = peft_counts
    return out


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(results: list[dict]) -> bool:
    rows = [("model", "measurement", "n", "best ms", "median ms", "max ms")]
    for r in results:
        for key, label in (
            ("cold", "(a) cold plan (discovery)"),
            ("warm", "(b) warm re-plan r/alpha/variant"),
            ("retarget", "(c) re-plan, new targets/layers"),
            ("peft", "(d) PEFT get_peft_model+count"),
        ):
            s = r[key]
            rows.append(
                (r["name"], label, str(s["n"]), fmt_ms(s["best"]), fmt_ms(s["median"]), fmt_ms(s["max"]))
            )
    print_table(rows)
    print()

    ok_all = True
    rows = [
        ("model", "ours warm med ms", "PEFT med ms", "PEFT/ours", "counts", f"warm < {TARGET_S * 1e3:.0f} ms")
    ]
    details = []
    for r in results:
        p = r["plan"]
        trainable, total = r["peft_counts"]
        match = (p.trainable_params, p.total_params) == (trainable, total)
        meets = r["warm"]["median"] < TARGET_S
        ok_all &= match
        rows.append(
            (
                r["name"],
                fmt_ms(r["warm"]["median"]),
                fmt_ms(r["peft"]["median"]),
                f"{r['peft']['median'] / r['warm']['median']:.0f}x",
                "OK" if match else "MISMATCH",
                "yes" if meets else "NO",
            )
        )
        details.append(
            f"{r['name']}: plan trainable {p.trainable_params:,} / total {p.total_params:,}; "
            f"PEFT trainable {trainable:,} / total {total:,}"
        )
    print_table(rows)
    print()
    for line in details:
        print(line)
    return ok_all


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 70B-shaped model")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the cold and retarget timings")
    parser.add_argument("--peft-repeats", type=int, default=3, help="repeats of the PEFT timing")
    args = parser.parse_args(argv)

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice at peft import
    import peft
    import torch
    import transformers

    import jupyter_lora as jl

    # Imports and first-use initialisation outside every timed region.
    jl.plan(meta_model(dict(SHAPES["llama-2-7b"], num_hidden_layers=1)), r=8, targets="all-linear")

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{torch.get_num_threads()} threads; meta-device models, times in ms"
    )
    print()
    names = ["llama-2-70b"] if args.quick else list(SHAPES)
    start = time.perf_counter()
    results = [bench_model(n, SHAPES[n], args.repeats, args.peft_repeats) for n in names]
    report(results)
    print(f"\nbenchmark took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
