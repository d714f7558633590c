"""Extra host memory and time of ``jupyter_lora.merge`` against PEFT's ``merge_and_unload``.

A Llama-shaped model (TinyLlama-1.1B widths: hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocab 32000;
``--layers`` decoder layers, 6 by default ≈ 0.41B parameters; 16 gives the 0.84B model of ANCHORS.md) is built from
its config with random weights, LoRA r=16 (alpha 32) is injected on all 7 linear projections with
``jupyter_lora.inject``, and every ``lora_B`` is set so that each module's update ``ΔW`` has ``‖ΔW‖ / ‖W‖ = --delta``
(Frobenius norms; a freshly injected adapter has ``ΔW = 0``, which would make any merge trivial). Then one of:

    peft           model.merge_and_unload()                  PEFT's default: adds in place, no NaN check
    peft-safe      model.merge_and_unload(safe_merge=True)   PEFT's checked merge: a copy per module
    jupyter_lora   jupyter_lora.merge(model)                 checked, and undone exactly if anything fails

Each variant runs in its own process (``--repeats`` rounds, interleaved, order rotated), with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once. Extra peak =
the process's peak resident set during the call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
minus the resident set just before; time = wall time of the call, with ``--threads`` torch threads (1 by default:
on a shared machine a busy core stalls every multi-threaded op, and this merge runs many more, smaller ops than
PEFT's). Prints medians, the ratios to ``peft`` and the goal (jupyter_lora ≤ 1.1× PEFT's extra peak), and whether
jupyter_lora's merged weights are bit-identical to each PEFT variant's (for 16-bit weights PEFT's two merges differ:
the default adds the fp32 update before rounding, the checked one rounds the update first, as jupyter_lora does).
About 2 minutes on a 2-core machine.

    python benchmarks/merge_memory.py [--layers 6] [--dtype fp32|bf16] [--delta 0.01] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("peft", "peft-safe", "jupyter_lora")
GOAL = 1.1  # jupyter_lora's extra peak over PEFT's merge_and_unload
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000)  # fmt: skip


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _adapted_model(layers: int, dtype: str, delta: float, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jupyter_lora as jl
    from jupyter_lora.core.adapters.peft_facts import adapter_layers

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE, num_hidden_layers=layers, tie_word_embeddings=False)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    model = jl.inject(model, r=16, alpha=32, targets="all-linear")
    with torch.no_grad():
        for _, layer in adapter_layers(model, ["default"]):
            weight, a, b = (
                layer.base_layer.weight,
                layer.lora_A["default"].weight,
                layer.lora_B["default"].weight,
            )
            # E‖s·B@A‖² = out · σ² · ‖A‖² for B ~ N(0, σ²): choose σ for the asked ‖ΔW‖ / ‖W‖.
            sigma = (
                delta
                * weight.float().norm()
                / (layer.scaling["default"] * weight.shape[0] ** 0.5 * a.float().norm())
            )
            b.copy_(torch.randn(b.shape) * sigma)
    return model


def _fingerprint(model) -> int:
    """A sum over every weight's bit patterns: equal for bit-identical models (in practice)."""
    import torch

    total = 0
    for p in model.parameters():
        ints = {2: torch.int16, 4: torch.int32}[p.element_size()]
        total += int(p.detach().reshape(-1).view(ints).sum(dtype=torch.int64))
    return total


def child(variant: str, layers: int, dtype: str, delta: float, seed: int, threads: int) -> dict:
    import gc

    import torch

    import jupyter_lora as jl

    model = _adapted_model(layers, dtype, delta, seed)
    params = sum(p.numel() for p in model.parameters())
    all_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if variant == "peft":
        merged = model.merge_and_unload()
    elif variant == "peft-safe":
        merged = model.merge_and_unload(safe_merge=True)
    else:
        merged = jl.merge(model)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    torch.set_num_threads(all_threads)
    return {
        "variant": variant,
        "extra_gib": (peak - before) / 2**20,
        "seconds": seconds,
        "params": params,
        "rss_gib": before / 2**20,
        "fingerprint": _fingerprint(merged),
    }


def run_child(variant: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", variant, "--layers", str(args.layers), "--dtype", args.dtype,
           "--delta", str(args.delta), "--seed", str(args.seed), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--delta", type=float, default=0.01, help="‖ΔW‖ / ‖W‖ of every adapted module")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.dtype, args.delta, args.seed, args.threads)))
        return

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            results[variant].append(run_child(variant, args))
            row = results[variant][-1]
            print(
                f"  round {r + 1} {variant:13s} +{row['extra_gib']:.3f} GiB  {row['seconds']:.2f} s",
                flush=True,
            )

    first = results["peft"][0]
    print(
        f"\nLlama {args.layers} layers, {first['params'] / 1e9:.2f}B parameters, {args.dtype}, LoRA r=16 on all "
        f"linear projections, ‖ΔW‖/‖W‖ = {args.delta}; resident before merging {first['rss_gib']:.2f} GiB; "
        f"medians of {args.repeats}\n"
    )
    med = {v: {k: statistics.median(row[k] for row in rows) for k in ("extra_gib", "seconds")}
           for v, rows in results.items()}  # fmt: skip
    base = med["peft"]
    print(f"{'variant':14s} {'extra peak':>11s} {'× peft':>7s} {'time':>8s} {'× peft':>7s}")
    for v in VARIANTS:
        m = med[v]
        print(
            f"{v:14s} {m['extra_gib']:>7.3f} GiB {m['extra_gib'] / base['extra_gib']:>6.2f}× "
            f"{m['seconds']:>6.2f} s {m['seconds'] / base['seconds']:>6.2f}×"
        )
    ratio = med["jupyter_lora"]["extra_gib"] / base["extra_gib"]
    print(f"\ngoal: jupyter_lora extra peak ≤ {GOAL}× PEFT's merge_and_unload — {'met' if ratio <= GOAL else 'MISSED'} "
          f"({ratio:.2f}×)")  # fmt: skip
    ours = {row["fingerprint"] for row in results["jupyter_lora"]}
    for v in ("peft", "peft-safe"):
        same = ours == {row["fingerprint"] for row in results[v]}
        print(f"jupyter_lora's merged weights bit-identical to {v}'s: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
