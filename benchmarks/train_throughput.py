"""Training throughput: the jupyter_lora engine against transformers.Trainer + PEFT, same model, data, batch and
sequence length, each variant in its own process (clean memory statistics), side by side.

    python benchmarks/train_throughput.py              # GPU when there is one (TinyLlama-1.1B shape), else CPU
    python benchmarks/train_throughput.py --quick      # fewer steps
    python benchmarks/train_throughput.py --ckpt       # both sides with gradient checkpointing

Model: Llama architecture built from a config (random weights; nothing downloaded) — on CUDA the TinyLlama-1.1B
shape of ../ANCHORS (hidden 2048, 22 layers, vocab 32000) in bf16, on CPU a small shape in fp32. LoRA r=16,
alpha=32, dropout 0 on all seven projections; random tokens, batch × seq fixed; fused AdamW where available.
Variants, one lever per line: the Trainer; our engine on the model's own loss; + the chunked LM loss (never all
fp32 logits at once, core/loss.py); + the progress widget observing every step; on CUDA also Liger's fused kernels
instead of the chunked loss (when liger-kernel is installed), checkpointing with the checkpoints offloaded to host
memory (ckpt: offload), and QLoRA (NF4 + double quant, bf16 compute) with the Trainer
(+ prepare_model_for_kbit_training) and with the engine (load_base).
Printed per variant: tokens/s after warm-up, peak memory (CUDA: max_memory_allocated; CPU: peak RSS), the ratio
to the Trainer, and on CUDA the model-FLOPs utilisation (6N-ish: 4·N_frozen + 6·N_trainable + attention, per
token, against the GPU's dense bf16 peak). The "engine + progress" line measures the progress display's cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=8000),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_FLOPS = {"H100": 798e12, "H200": 790e12}


def _setup(shape: str, dtype_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # initialised where it trains: a 1.1B CPU init takes longer than the timed steps
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype=dtype)
    return model, config


def _data(config, n: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (n, seq), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


def _peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _timer(times: list, cuda: bool):
    """A TrainerCallback noting the time at every step's end: both sides are timed the same way."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    return Timer


def run_variant(args) -> dict:
    """One measurement in this process; prints a JSON line."""
    import torch

    cuda = torch.cuda.is_available()
    shape = "tinyllama" if cuda else "cpu"
    if "qlora" in args.variant:
        import jupyter_lora as jl

        model, _ = jl.load_base(args.path, 4)  # NF4 + double quant, bf16 compute
        config = model.config
    else:
        model, config = _setup(shape, "bf16" if cuda else "fp32")
    n = (args.warmup + args.steps) * args.batch
    data = _data(config, n, args.seq)
    times: list[float] = []
    Timer = _timer(times, cuda)

    if args.variant.startswith("trainer"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if "qlora" in args.variant:  # the usual recipe: HF's k-bit preparation (fp32 upcasts and all)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.ckpt)
        from transformers import Trainer, TrainingArguments, default_data_collator

        peft = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
        )

        rows = [
            {"input_ids": r["input_ids"], "labels": r["input_ids"], "attention_mask": [1] * args.seq}
            for r in data
        ]
        targs = TrainingArguments(
            output_dir=os.path.join(args.tmp, f"trainer-{os.getpid()}"), per_device_train_batch_size=args.batch,
            max_steps=args.warmup + args.steps, learning_rate=2e-4, logging_steps=10**9, save_strategy="no",
            report_to=[], bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
            gradient_checkpointing=args.ckpt, dataloader_num_workers=0, disable_tqdm=True, warmup_steps=0,
        )  # fmt: skip
        trainer = Trainer(model=peft, args=targs, train_dataset=rows, data_collator=default_data_collator,
                          callbacks=[Timer()])  # fmt: skip
        trainer.train()
    else:
        import jupyter_lora as jl

        adapted = jl.inject(model, r=16, alpha=32, dropout=0.0, targets=",".join(TARGETS))
        observers = []
        if args.variant == "engine+progress":
            from jupyter_lora.widgets.progress import ProgressWidget

            observers.append(ProgressWidget(stop=lambda: None))
        # "engine" is the plain path; the others add one lever each to the chunked loss
        chunked = args.variant not in ("engine", "engine+liger")
        kernels = "liger" if args.variant == "engine+liger" else "none"
        ckpt = "offload" if args.variant == "engine+offload" else args.ckpt
        jl.train(adapted, data, steps=args.warmup + args.steps, lr=2e-4, batch=args.batch, seq=args.seq, eval=0,
                 warmup=0, ckpt=ckpt, observers=observers, output_dir=os.path.join(args.tmp, f"{args.variant}-{os.getpid()}"),
                 background=False, chunked_loss=chunked, kernels=kernels, callbacks=[Timer()])  # fmt: skip
    # Bytes of the frozen weights as loaded (packed 4-bit weights count their storage), for the QLoRA goal.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    timed = times[args.warmup :]
    seconds = timed[-1] - times[args.warmup - 1] if len(timed) and args.warmup else times[-1] - times[0]
    tokens = args.steps * args.batch * args.seq
    n_params = sum(p.numel() for p in model.parameters())
    if args.variant.startswith("trainer"):
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    result = {"variant": args.variant, "tokens_per_s": tokens / seconds, "peak": _peak_memory(), "params": n_params,
              "weight_bytes": weight_bytes,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "seq": args.seq, "batch": args.batch,
              "layers": config.num_hidden_layers, "hidden": config.hidden_size}  # fmt: skip
    print("RESULT " + json.dumps(result))
    return result


def _mfu(r: dict) -> str:
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in r["device"]), None)
    if peak is None:
        return "-"
    # Frozen weights: forward 2N + input-gradient 2N; attention adds 12·L·h·s per token (fwd+bwd, causal halves).
    flops_per_token = 4 * r["params"] + 6 * r["layers"] * r["hidden"] * r["seq"]
    return f"{100 * r['tokens_per_s'] * flops_per_token / peak:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing on both sides")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; min and median reported")
    parser.add_argument("--variants", help="comma-separated subset, e.g. trainer,engine")
    parser.add_argument("--tmp", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "jl-bench"))
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    import torch

    cuda = torch.cuda.is_available()
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (1024 if cuda else 256)
    args.steps = args.steps or ((10 if args.quick else 30) if cuda else (5 if args.quick else 12))
    args.warmup = args.warmup or (3 if args.quick else 8) if cuda else (args.warmup or 2)
    results = []
    variants = ["trainer", "engine", "engine+chunked_loss", "engine+progress"]
    chosen = args.variants.split(",") if args.variants else None
    path = ""
    if cuda:  # QLoRA quantises on load, from files: a random bf16 checkpoint of the same shape
        variants += ["engine+offload", "trainer+qlora", "engine+qlora"]
        if importlib.util.find_spec("liger_kernel") is not None:
            variants.insert(3, "engine+liger")
        path = os.path.join(args.tmp, "checkpoint")
        if not os.path.exists(os.path.join(path, "config.json")):  # a second run (--ckpt) reuses it
            model, _ = _setup("tinyllama", "bf16")
            model.save_pretrained(path)
            del model
    if importlib.util.find_spec("ipywidgets") is None:
        variants.remove("engine+progress")
        print(
            "engine+progress: skipped (the progress display needs ipywidgets, not installed here)", flush=True
        )
    if chosen:
        variants = [v for v in variants if v in chosen]
    runs: dict[str, list[dict]] = {}
    for variant in [v for _ in range(args.repeats) for v in variants]:  # interleaved: load swings hit all
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--tmp", args.tmp, "--path", path]  # fmt: skip
        if args.ckpt:
            cmd.append("--ckpt")
        out = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        found = json.loads(line[7:])
        runs.setdefault(variant, []).append(found)
        # one line per run as it ends: a caller that stops this script early keeps what was measured
        print(
            f"{variant}: {found['tokens_per_s']:,.0f} tokens/s, peak {found['peak'] / 2**30:.2f} GiB",
            flush=True,
        )
    for found in runs.values():  # the median run of each variant (by tokens/s)
        found.sort(key=lambda r: r["tokens_per_s"])
        results.append(
            {**found[len(found) // 2], "min_tokens_per_s": found[0]["tokens_per_s"], "n": len(found)}
        )
    if not results:
        sys.exit(1)
    base = next((r for r in results if r["variant"] == "trainer"), results[0])
    r0 = results[0]
    print(f"device: {r0['device']}  model: Llama {r0['layers']} layers × {r0['hidden']}, {r0['params'] / 1e6:.0f}M params"
          f"  batch {args.batch} × seq {args.seq}  steps {args.steps} (+{args.warmup} warm-up)"
          f"{'  gradient checkpointing' if args.ckpt else ''}")  # fmt: skip
    print(f"{'variant':<18}{'tokens/s':>12}{'× Trainer':>11}{'peak memory':>14}{'× Trainer':>11}{'MFU':>8}")
    for r in results:
        print(f"{r['variant']:<18}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / base['tokens_per_s']:>11.2f}"
              f"{r['peak'] / 2**30:>12.2f} G{r['peak'] / base['peak']:>11.2f}{_mfu(r):>8}")  # fmt: skip
    if args.repeats > 1:
        print(f"medians of {args.repeats} interleaved repeats; slowest run's ratio (min/min): " + ", ".join(
            f"{r['variant']} {r['min_tokens_per_s'] / base['min_tokens_per_s']:.2f}" for r in results))  # fmt: skip
    engine = next((r for r in results if r["variant"] == "engine+chunked_loss"), None)
    progress = next((r for r in results if r["variant"] == "engine+progress"), None)
    if engine and progress:
        print(f"progress display cost: {100 * (1 - progress['tokens_per_s'] / engine['tokens_per_s']):+.1f}% of "
              "throughput (goal ≤ 2%)")  # fmt: skip
    qlora = next((r for r in results if r["variant"] == "engine+qlora"), None)
    bf16 = next((r for r in results if r["variant"] == "engine+chunked_loss"), None)
    if qlora and bf16:
        saving = bf16["weight_bytes"] - qlora["weight_bytes"]
        limit = bf16["peak"] - 0.9 * saving
        print(f"QLoRA vs bf16 LoRA (engine): {qlora['tokens_per_s'] / bf16['tokens_per_s']:.2f}× tokens/s (goal ≥ 0.9); "
              f"peak {qlora['peak'] / 2**30:.2f} GiB vs limit {limit / 2**30:.2f} GiB = bf16 peak − 0.9 × weight saving "
              f"({'met' if qlora['peak'] <= limit else 'NOT met'})")  # fmt: skip
    if not cuda:
        print("note: CPU run — speed goals are for the GPU; peak memory is the process's peak RSS.")


if __name__ == "__main__":
    main()
