"""Latency of ``jupyter_lora.plan`` on meta-device Llama models, against the calls PEFT offers to learn the same
counts — first call against first call, repeat against repeat.

For Llama-2-7B-, Llama-2-70B- and Llama-3.1-405B-shaped models built on the meta device (``torch.device("meta")``,
no weights allocated), LoRA on all linear layers, this measures with ``time.perf_counter``:

first call — on a freshly built model (built outside the timed region), r=16:
  ours       ``plan(model, r=16, targets="all-linear")``: one walk over the model (the module index), target
             resolution and the counts;
  PEFT       ``get_peft_model(model, config)`` + ``get_nb_trainable_parameters()``;
  PEFT low   the same with ``low_cpu_mem_usage=True`` (the LoRA weights made on the meta device, not in memory
             first: the fair baseline for counting);
  inject low ``inject_adapter_in_model(config, model, low_cpu_mem_usage=True)`` + counting the trainable and all
             parameters.
repeat — the counts for another r on the same model (each r new):
  ours       ``plan`` again: the cached index and resolution are reused;
  PEFT       ``add_adapter(name, config)`` on the PeftModel of the first call + counting the new adapter's
             parameters (the adapter is deleted again outside the timed region);
  PEFT low   the same with ``low_cpu_mem_usage=True``;
  inject low ``inject_adapter_in_model(config, model, adapter_name=name, low_cpu_mem_usage=True)`` on the model of
             the first call + counting (deleted again, untimed).
and (c) re-plans with a targets/layers spec not seen before (a new resolution on the cached index).

The cyclic garbage collector is run before and paused during each timed call (as ``timeit`` does). It prints
best / median / p95 / max per measurement, the side-by-side medians with PEFT/ours for first and repeat calls, and whether
the counts equal PEFT's. ``--quick``: only the 70B shape; ``--models``: the shapes to run.

    python benchmarks/plan_latency.py [--quick] [--models llama-2-7b,...] [--repeats N] [--peft-repeats N]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import warnings
from functools import partial

from jupyter_lora.testing import LLAMA_SHAPES as SHAPES

TARGET_S = 0.010  # a re-plan must keep up with a slider
PEFT_PATHS = ("PEFT", "PEFT low", "inject low")


def meta_model(shape: str, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    from jupyter_lora.testing import llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(shape, **overrides))


def timed(fn) -> tuple[float, object]:
    """Seconds ``fn()`` took, with Python's cyclic GC collected before and paused during the call (as
    ``timeit`` does): a full collection of the earlier meta models costs ~0.3 s and would otherwise land
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
    ordered = sorted(times)
    k = (len(ordered) - 1) * 0.95  # the 95th percentile, linear between the nearest ranks
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    p95 = ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
    return {
        "best": min(times),
        "median": statistics.median(times),
        "p95": p95,
        "max": max(times),
        "n": len(times),
    }


def lora_config(r: int):
    from peft import LoraConfig

    return LoraConfig(r=r, target_modules="all-linear")


def adapter_params(model, name: str) -> int:
    """Parameters of adapter ``name`` (PEFT names them ``<module>.lora_A.<name>.weight``, ...)."""
    return sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n)


def peft_first(path: str, model):
    """(the adapted model, (trainable, total)) from PEFT's ``path`` on a fresh model."""
    from peft import get_peft_model, inject_adapter_in_model

    if path == "inject low":
        adapted = inject_adapter_in_model(lora_config(16), model, low_cpu_mem_usage=True)
        params = list(adapted.parameters())
        return adapted, (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    adapted = get_peft_model(model, lora_config(16), low_cpu_mem_usage=path == "PEFT low")
    return adapted, adapted.get_nb_trainable_parameters()


def peft_repeat(path: str, adapted, name: str, r: int) -> int:
    """Add adapter ``name`` with rank ``r`` to the model of the first call and count its parameters."""
    from peft import inject_adapter_in_model

    if path == "inject low":
        inject_adapter_in_model(lora_config(r), adapted, adapter_name=name, low_cpu_mem_usage=True)
    else:
        adapted.add_adapter(name, lora_config(r), low_cpu_mem_usage=path == "PEFT low")
    return adapter_params(adapted, name)


def drop_adapter(path: str, adapted, name: str) -> None:
    if path != "inject low":
        adapted.delete_adapter(name)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in adapted.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(name)


def bench_model(shape: str, repeats: int, peft_repeats: int) -> dict:
    import jupyter_lora as jl

    out: dict = {"name": shape}
    ranks = [r for r in range(2, 64, 2) if r != 16]  # 30 ranks, none of them the first call's

    # ours, first call: a fresh model per repeat, so every call walks the model.
    first, model = [], None
    for _ in range(repeats):
        model = meta_model(shape)
        t, p = timed(partial(jl.plan, model, r=16, targets="all-linear"))
        first.append(t)
        out["plan"] = p
    out["ours first"] = stats(first)

    # ours, repeat: the same model, a new r each time (and for the counts check, each r's adapter size).
    repeat, sizes = [], {}
    for r in ranks:
        t, p = timed(partial(jl.plan, model, r=r, targets="all-linear"))
        repeat.append(t)
        sizes[r] = p.adapter_params
    out["ours repeat"] = stats(repeat)

    # (c) new targets/layers spec each time (a resolution not cached yet), the index cached.
    layers = SHAPES[shape]["num_hidden_layers"]
    specs = [
        dict(targets="q_proj,v_proj", layers=f"0-{k}")
        if i % 3 == 0
        else dict(targets="attention", layers=f"{k}-{layers - 1}")
        if i % 3 == 1
        else dict(targets="mlp", layers=f"0-{k}", exclude="down_proj")
        for i, k in enumerate(range(1, layers, max(1, layers // max(repeats, 3))))
    ][: max(repeats, 3)]
    out["ours retarget"] = stats([timed(partial(jl.plan, model, r=16, **s))[0] for s in specs])
    model = None
    gc.collect()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in PEFT_PATHS:
            first, repeat, adapted = [], [], None
            for _ in range(peft_repeats):
                adapted = None
                gc.collect()
                fresh = meta_model(shape)
                t, (adapted, counts) = timed(partial(peft_first, path, fresh))
                first.append(t)
                out[f"{path} counts"] = counts
            for r in ranks[:peft_repeats]:
                name = f"r{r}"
                t, n = timed(partial(peft_repeat, path, adapted, name, r))
                repeat.append(t)
                out.setdefault(f"{path} repeat counts", []).append((sizes.get(r), n))
                drop_adapter(path, adapted, name)
            out[f"{path} first"] = stats(first)
            out[f"{path} repeat"] = stats(repeat)
            adapted = None
            gc.collect()
    return out


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(results: list[dict]) -> bool:
    rows = [("model", "measurement", "n", "best ms", "median ms", "p95 ms", "max ms")]
    labels = [
        ("ours first", "ours: first plan (walks the model)"),
        ("ours repeat", "ours: repeat plan, new r"),
        ("ours retarget", "ours: re-plan, new targets/layers"),
        ("PEFT first", "PEFT: get_peft_model + count"),
        ("PEFT repeat", "PEFT: add_adapter new r + count"),
        ("PEFT low first", "PEFT low_cpu_mem_usage: get_peft_model"),
        ("PEFT low repeat", "PEFT low_cpu_mem_usage: add_adapter"),
        ("inject low first", "PEFT low_cpu_mem_usage: inject_adapter"),
        ("inject low repeat", "PEFT low_cpu_mem_usage: inject again"),
    ]
    for r in results:
        for key, label in labels:
            s = r[key]
            rows.append((r["name"], label, str(s["n"]), fmt_ms(s["best"]), fmt_ms(s["median"]), fmt_ms(s["p95"]),
                         fmt_ms(s["max"])))  # fmt: skip
    print_table(rows)
    print()

    rows = [("model", "PEFT path", "first: ours ms", "PEFT ms", "PEFT/ours", "repeat: ours ms", "PEFT ms",
             "PEFT/ours")]  # fmt: skip
    for r in results:
        ours_first, ours_repeat = r["ours first"]["median"], r["ours repeat"]["median"]
        for path, label in zip(
            PEFT_PATHS,
            ("get_peft_model", "get_peft_model, low_cpu_mem_usage", "inject_adapter, low_cpu_mem_usage"),
            strict=True,
        ):
            first, repeat = r[f"{path} first"]["median"], r[f"{path} repeat"]["median"]
            rows.append(
                (r["name"], label, fmt_ms(ours_first), fmt_ms(first), f"{first / ours_first:.1f}x",
                 fmt_ms(ours_repeat), fmt_ms(repeat), f"{repeat / ours_repeat:.0f}x")
            )  # fmt: skip
    print_table(rows)
    print()

    ok_all = True
    for r in results:
        p = r["plan"]
        lines = []
        for path in PEFT_PATHS:
            match = (p.trainable_params, p.total_params) == tuple(r[f"{path} counts"])
            match &= all(ours == theirs for ours, theirs in r[f"{path} repeat counts"])
            ok_all &= match
            lines.append(f"{path} {'OK' if match else 'MISMATCH'}")
        meets = r["ours repeat"]["p95"] <= TARGET_S
        print(
            f"{r['name']}: plan trainable {p.trainable_params:,} / total {p.total_params:,}; counts equal PEFT's "
            f"(first and repeat): {', '.join(lines)}; repeat plan p95 ≤ {TARGET_S * 1e3:.0f} ms: "
            f"{'yes' if meets else 'NO'}"
        )
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
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated model shapes")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats of our first-call and retarget timings"
    )
    parser.add_argument("--peft-repeats", type=int, default=3, help="repeats of each PEFT timing")
    args = parser.parse_args(argv)

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-kernel notice at peft import
    import peft
    import torch
    import transformers

    import jupyter_lora as jl

    # Imports and first-use initialisation outside every timed region, for both sides.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jl.plan(meta_model("llama-2-7b", num_hidden_layers=1), r=8, targets="all-linear")
        for path in PEFT_PATHS:
            peft_repeat(path, peft_first(path, meta_model("llama-2-7b", num_hidden_layers=1))[0], "warm", 8)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{torch.get_num_threads()} threads; meta-device models, times in ms"
    )
    print()
    names = ["llama-2-70b"] if args.quick else [s.strip() for s in args.models.split(",") if s.strip()]
    start = time.perf_counter()
    results = [bench_model(n, args.repeats, args.peft_repeats) for n in names]
    ok = report(results)
    print(f"\nbenchmark took {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
