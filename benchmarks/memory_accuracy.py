"""Memory estimate against measurement: ``jupyter_lora.estimate`` vs ``torch.cuda.max_memory_allocated()`` over
bf16 / NF4 × gradient checkpointing off / on × seq {512, 2048}, for a Llama-shaped model (TinyLlama-1.1B shape)
and a second architecture (Qwen2-shaped), both built from configs with random weights. Each cell trains 3 steps
with the jupyter_lora engine (LoRA r=16 on all linear projections, AdamW, batch 4) in a fresh process and compares
the peak with the estimate's allocator-visible total. Goal: every cell within ±10%.

    python benchmarks/memory_accuracy.py            # needs a CUDA GPU (and bitsandbytes for the NF4 cells)
    python benchmarks/memory_accuracy.py --quick    # seq 512 only

Prints one row per cell: estimate, measured, error %; then the worst error. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = {
    "llama-1.1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)),
    "qwen2-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
}  # fmt: skip
BATCH = 4


def _checkpoint(shape: str, root: str) -> str:
    """A random-weight checkpoint of ``shape`` in bf16 on disk (4-bit loading quantises from files)."""
    import torch
    import transformers

    path = os.path.join(root, shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        config_cls, kwargs = SHAPES[shape]
        config = getattr(transformers, config_cls)(**kwargs, tie_word_embeddings=False)
        with torch.device(
            "cuda"
        ):  # initialised on the GPU: a CPU init of 1.1B random weights takes half a minute
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
    return path


def cell(args) -> None:
    import torch

    import jupyter_lora as jl

    model, _ = jl.load_base(args.path, 4 if args.quant == "nf4" else None)
    model = jl.inject(model, r=16, targets="all-linear")
    plan = jl.plan(model, r=16, targets="all-linear")
    est = jl.estimate(model, plan, seq=args.seq, batch=BATCH, ckpt=args.ckpt)
    data = [{"input_ids": torch.randint(3, 30000, (args.seq,)).tolist()} for _ in range(BATCH * 3)]
    torch.cuda.reset_peak_memory_stats()
    jl.train(model, data, steps=3, batch=BATCH, seq=args.seq, eval=0, ckpt=args.ckpt, output_dir=args.out,
             background=False, save_every=None)  # fmt: skip
    measured = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps({"estimate": est.allocated_bytes, "measured": measured,
                                  "breakdown": est.breakdown}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path")
    parser.add_argument("--quant")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.cell:
        cell(args)
        return
    import torch

    if not torch.cuda.is_available():
        print(
            "memory_accuracy: needs a CUDA GPU (the estimate is compared with torch.cuda.max_memory_allocated)."
        )
        return
    root = tempfile.mkdtemp(prefix="jl-mem-")
    rows = []
    print(
        f"{'model':<12}{'weights':<8}{'ckpt':<6}{'seq':>6}{'estimate GiB':>14}{'measured GiB':>14}{'error':>9}"
    )
    for shape in SHAPES:
        path = _checkpoint(shape, root)
        for quant in ("bf16", "nf4"):
            for ckpt in (False, True):
                for seq in (512,) if args.quick else (512, 2048):
                    cmd = [sys.executable, __file__, "--cell", "--path", path, "--quant", quant, "--seq", str(seq),
                           "--out", os.path.join(root, f"run-{shape}-{quant}-{ckpt}-{seq}")] + (["--ckpt"] if ckpt else [])  # fmt: skip
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        print(
                            f"{shape:<12}{quant:<8}{ckpt!s:<6}{seq:>6}  failed: {out.stderr.strip()[-300:]}",
                            flush=True,
                        )
                        continue
                    r = json.loads(line[7:])
                    error = 100 * (r["estimate"] - r["measured"]) / r["measured"]
                    rows.append(error)
                    print(f"{shape:<12}{quant:<8}{ckpt!s:<6}{seq:>6}{r['estimate'] / 2**30:>14.2f}"
                          f"{r['measured'] / 2**30:>14.2f}{error:>+8.1f}%", flush=True)  # fmt: skip
    if rows:
        worst = max(rows, key=abs)
        print(f"worst error {worst:+.1f}% — goal ±10%: {'met' if abs(worst) <= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
