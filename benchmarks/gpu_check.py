"""Every GPU figure in one command (``make gpu-check OUT=dir``): the training throughput table for bf16 and QLoRA
with gradient checkpointing off and on (``train_throughput.py``), the memory estimate against measured peaks
(``memory_accuracy.py --quick``), the GPU tests (``pytest -m gpu``) and multi-adapter serving (``multi_adapter.py``), each in its own process with a time limit,
written as markdown (``gpu_check.md``) and JSON (``gpu_check.json``) into ``--out``. Needs only torch,
transformers, peft, accelerate, bitsandbytes (for the QLoRA rows) and this package's core; without CUDA it says so
and writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# (name, command, time limit in seconds), most wanted first; together they get --budget seconds (default 470, under
# the 8 minutes a check may take), each at most its own limit and what is left, so the files are always written.
# the other levers are measured in the first table
CKPT_VARIANTS = "trainer,engine+chunked_loss,trainer+qlora,engine+qlora"
PARTS = [
    ("throughput, checkpointing off", [sys.executable, str(HERE / "train_throughput.py"), "--quick"], 170),
    ("memory estimate vs measured", [sys.executable, str(HERE / "memory_accuracy.py"), "--quick"], 110),
    (
        "GPU tests",
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"],
        90,
    ),
    (
        "throughput, checkpointing on",
        [sys.executable, str(HERE / "train_throughput.py"), "--quick", "--ckpt", "--variants", CKPT_VARIANTS],
        150,
    ),
    (
        "serving several adapters: one mixed batch vs set_adapter per adapter",
        [
            sys.executable,
            str(HERE / "multi_adapter.py"),
            "--hidden",
            "2048",
            "--layers",
            "22",
            "--vocab",
            "32000",
            "--prompts",
            "16",
            "--adapters",
            "8",
            "--new-tokens",
            "64",
        ],
        60,
    ),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="out/gpu-check", help="directory for gpu_check.md and gpu_check.json"
    )
    parser.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; the GPU figures wait for a machine with one.")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    device = torch.cuda.get_device_name()
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate")}
    results = []
    for name, command, limit in PARTS:
        limit = min(limit, deadline - time.monotonic())
        if limit < 10:
            results.append({"part": name, "command": " ".join(command[1:]), "status": "no time left",
                            "seconds": 0.0, "output": ""})  # fmt: skip
            _write(out, device, versions, results)
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status, text = done.returncode, done.stdout + (done.stderr[-3000:] if done.returncode else "")
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or ""
            status, text = "timeout", partial.decode() if isinstance(partial, bytes) else partial
        seconds = time.perf_counter() - start
        results.append({"part": name, "command": " ".join(command[1:]), "status": status, "seconds": seconds,
                        "output": text})  # fmt: skip
        print(f"== {name} ({seconds:.0f} s, {status})\n{text}", flush=True)
        # after every part: a check stopped later keeps what it measured
        _write(out, device, versions, results)
    return 0 if all(r["status"] == 0 for r in results) else 1


def _write(out: Path, device: str, versions: dict, results: list) -> None:
    (out / "gpu_check.json").write_text(
        json.dumps({"device": device, "versions": versions, "parts": results}, indent=1)
    )
    lines = [f"# GPU check on {device}", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    for r in results:
        lines += [
            f"## {r['part']} ({r['seconds']:.0f} s, exit {r['status']})",
            "",
            "```",
            r["output"].strip(),
            "```",
            "",
        ]
    (out / "gpu_check.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
