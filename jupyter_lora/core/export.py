"""Export the notebook's job to a directory that runs on its own — with ``python train.py`` on one device or
``accelerate launch`` on many (DDP), or FSDP for models that do not fit one GPU. The script uses this package's
training engine (built on ``accelerate.Accelerator``), so the run behaves as it does in the notebook.

Written files: ``train.py``; ``job.json`` (base model, training settings, data and tokenizer locations);
``adapter/`` (the adapter as it is now, PEFT format — the job starts from exactly these weights); ``base/`` when
the base has no name to load it by (a model built from a config); ``data.jsonl`` unless the data is a file path;
``tokenizer/`` when a tokenizer is given; ``accelerate_ddp.yaml``, ``accelerate_fsdp.yaml``; ``README.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UsageError

__all__ = ["ExportResult", "export"]


@dataclass(frozen=True)
class ExportResult:
    """Where the job was written and how to run it."""

    directory: Path
    files: tuple[str, ...]
    commands: tuple[str, ...]

    def __repr__(self) -> str:
        return f"ExportResult({str(self.directory)!r}: {len(self.files)} files; run: {self.commands[0]!r})"


_TRAIN_PY = '''"""Train the exported LoRA job. One device:  python train.py
Many GPUs (DDP):  accelerate launch --config_file accelerate_ddp.yaml train.py
Several CPU processes (DDP over gloo):  torchrun --nproc_per_node 2 train.py
"""

import json
import sys
from pathlib import Path

import jupyter_lora as jl

HERE = Path(__file__).resolve().parent


def main() -> None:
    job = json.loads((HERE / "job.json").read_text())
    import transformers

    auto = getattr(transformers, job["auto_class"])
    base = auto.from_pretrained(str(HERE / job["base"]) if job["base_is_local"] else job["base"], dtype=job["dtype"])
    tokenizer = None
    if job["tokenizer"]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(HERE / job["tokenizer"]))
    model = jl.load(base, HERE / "adapter", name=job["adapter_name"])
    data = str(HERE / job["data"]) if job["data_is_local"] else job["data"]
    settings = dict(job["train"])
    settings.setdefault("output_dir", str(HERE / "runs"))
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # several CPU processes: DDP over gloo

    def log(event):
        if state.is_main_process and event.kind in ("start", "eval", "checkpoint", "stop", "end"):
            print(event.kind, event.step, {k: v for k, v in event.data.items() if k != "config"}, flush=True)

    run = jl.train(model, data, tokenizer=tokenizer, observers=[log], background=False, **settings)
    state.wait_for_everyone()
    if state.is_main_process:
        out = jl.save(model, Path(settings["output_dir"]) / "adapter")
        print(f"adapter saved to {out}; state {run.state}, step {run.step}", flush=True)
    return 0 if run.state in ("finished", "stopped", "early_stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
'''

_DDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: {n}
mixed_precision: bf16
"""

_FSDP_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: {n}
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: {layer}
  fsdp_use_orig_params: true
  fsdp_cpu_ram_efficient_loading: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""


def _records(data: Any) -> list[dict]:
    from .data.sources import load_source

    items = load_source(data, "data").items
    return [{"text": x} if isinstance(x, str) else dict(x) for x in items]


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    data: Any,
    *,
    tokenizer: Any = None,
    base: str | None = None,
    num_processes: int | None = None,
    **train_settings: Any,
) -> ExportResult:
    """Write a standalone training job for the adapter ``model`` holds, on ``data``, with ``train_settings``
    (as for ``train``). ``base``: the model id or path the script loads (default: the model's own name or path;
    a model built from a config is saved into the job)."""
    import torch

    from .adapters import save
    from .adapters.guards import require_adapters
    from .adapters.operations import unload_clean
    from .adapters.peft_facts import active_names
    from .modelinfo import base_model_of
    from .train import make_train_config
    from .transaction import Transaction

    peft_model = require_adapters(model, "export")
    config = make_train_config(**train_settings)  # validate now, not in the exported run
    target = Path(directory).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(
            f"`directory` {str(target)!r} exists and is not empty; choose a new directory for the job."
        )
    target.mkdir(parents=True, exist_ok=True)
    files = ["train.py", "job.json", "adapter/"]
    name = active_names(peft_model)[0]
    save(peft_model, target / "adapter", name=name)

    base_model = base_model_of(peft_model)
    source = base or getattr(base_model.config, "_name_or_path", "") or ""
    base_is_local = False
    if source and os.path.isdir(source):
        source, base_is_local = os.path.abspath(source), False
    elif not source:
        # A model built from a config has no name to load it by: save the base (adapter taken off, then the
        # model restored exactly as it was by the transaction).
        transaction = Transaction(peft_model)
        with transaction:
            clean = unload_clean(peft_model)
            clean.save_pretrained(str(target / "base"))
            transaction.restore()
        source, base_is_local = "base", True
        files.append("base/")

    if isinstance(data, (str, os.PathLike)) and os.path.exists(data):
        data_ref, data_is_local = os.path.abspath(data), False
    else:
        rows = _records(data)
        with open(target / "data.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        data_ref, data_is_local = "data.jsonl", True
        files.append("data.jsonl")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target / "tokenizer"))
        files.append("tokenizer/")

    dtype = next((p.dtype for p in base_model.parameters() if p.dtype.is_floating_point), torch.float32)
    settings = {k: v for k, v in asdict(config).items() if k in train_settings}
    job = {
        "base": source, "base_is_local": base_is_local, "auto_class": _auto_class(base_model),
        "dtype": str(dtype).replace("torch.", ""), "adapter_name": name, "data": data_ref,
        "data_is_local": data_is_local, "tokenizer": "tokenizer" if tokenizer is not None else None,
        "train": settings,
    }  # fmt: skip
    (target / "job.json").write_text(json.dumps(job, indent=1))
    (target / "train.py").write_text(_TRAIN_PY)
    n = num_processes or max(2, torch.cuda.device_count())
    layer = _layer_class(base_model)
    (target / "accelerate_ddp.yaml").write_text(_DDP_YAML.format(n=n))
    (target / "accelerate_fsdp.yaml").write_text(_FSDP_YAML.format(n=n, layer=layer))
    files += ["accelerate_ddp.yaml", "accelerate_fsdp.yaml", "README.md"]
    commands = (
        "python train.py",
        "accelerate launch --config_file accelerate_ddp.yaml train.py",
        "accelerate launch --config_file accelerate_fsdp.yaml train.py",
        "torchrun --nproc_per_node 2 train.py",
    )
    (target / "README.md").write_text(
        "# Exported jupyter-lora training job\n\nRun from this directory:\n\n"
        + "\n".join(f"    {c}" for c in commands)
        + "\n\nThe first trains on one device; DDP runs one process per GPU (edit `num_processes`); FSDP shards a "
        "model that does not fit one GPU; the last runs two CPU processes (DDP over gloo, no GPU needed). The adapter is written to "
        "runs/adapter and loads with `jupyter_lora.load(model, path)` or `PeftModel.from_pretrained`.\n"
    )
    return ExportResult(target, tuple(files), commands)


def _auto_class(model: nn.Module) -> str:
    from .modelinfo import detect_task

    task = detect_task(model).task_type
    return {
        "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    }.get(task or "", "AutoModel")  # fmt: skip


def _layer_class(model: nn.Module) -> str:
    from .targets import index_model

    index = index_model(model)
    for path in index.layer_lists:
        blocks = model.get_submodule(path)
        if len(blocks):
            return type(blocks[0]).__name__
    return "LlamaDecoderLayer"
