"""Export the notebook's job to a directory that runs on its own: a plain ``transformers.Trainer`` script
(``train.py``) with the adapter, the tokenized data and the ``TrainingArguments`` the notebook's settings make. It
runs with ``python train.py`` on one device, ``torchrun`` or ``accelerate launch`` on many (DDP), or FSDP for models
that do not fit one GPU; it needs torch, transformers and peft, not this package.

Written files: ``train.py``; ``job.json`` (base model, ``TrainingArguments`` fields, global batch, precision);
``adapter/`` (the adapter as it is now, PEFT format — the job starts from exactly these weights); ``base/`` when the
base has no name to load it by (a model built from a config); ``train.jsonl`` (and ``eval.jsonl``): the examples as
the notebook tokenized them; ``tokenizer/`` when there is one; ``accelerate_ddp.yaml``, ``accelerate_fsdp.yaml``;
``README.md``. The job directory appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
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


_TRAIN_PY = '''"""Train the exported LoRA adapter with transformers.Trainer.

One device:                python train.py
Continue a stopped run:    python train.py --resume
Several GPUs (DDP):        accelerate launch --config_file accelerate_ddp.yaml train.py
A model too big for one:   accelerate launch --config_file accelerate_fsdp.yaml train.py
Two CPU processes (DDP):   torchrun --nproc_per_node 2 train.py

job.json holds the TrainingArguments the notebook's settings made; train.jsonl / eval.jsonl the examples as the
notebook tokenized them. The trained adapter is written to runs/adapter (PeftModel.from_pretrained loads it).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import transformers
from peft import PeftModel

HERE = Path(__file__).resolve().parent
JOB = json.loads((HERE / "job.json").read_text())
OUT = HERE / "runs"
IGNORE_INDEX = -100  # label of tokens that are not learned (prompt, padding)


def read_jsonl(name, required):
    path = HERE / name
    if not path.exists():
        if required:
            sys.exit(f"{path} is missing: the job trains on it. Export the job again from the notebook.")
        return None
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def collate(examples):
    """Pad a batch to its longest example. Written out because the job needs no tokenizer object to pad
    pre-tokenized examples (transformers' padding collators take one)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), JOB["pad_token_id"], dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        mask[row, :n] = 1
        if "labels" in ex:
            labels[row, :n] = torch.tensor(ex["labels"])
    batch = {"input_ids": ids, "attention_mask": mask}
    if JOB["task"] == "SEQ_CLS":
        batch["labels"] = torch.tensor([ex["label"] for ex in examples])
    else:
        batch["labels"] = labels
    return batch


def accuracy(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


def main():
    cuda = torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not cuda:
        sys.exit("FSDP shards the model over GPUs and this machine has none: run with accelerate_ddp.yaml or "
                 "torchrun here, or FSDP on a GPU machine.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if JOB["batch"] % world:
        sys.exit(f"batch {JOB['batch']} (all processes together) does not split evenly over {world} processes.")

    args = dict(JOB["training_arguments"])
    args["per_device_train_batch_size"] = args["per_device_eval_batch_size"] = JOB["batch"] // world
    precision = JOB["precision"]
    if precision == "auto":  # bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    args.update(bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda)
    if cuda and args["optim"] == "adamw_torch":
        args["optim"] = "adamw_torch_fused"
    if cuda and JOB["kernels"] != "none" and importlib.util.find_spec("liger_kernel") is not None:
        args["use_liger_kernel"] = True  # Liger's fused RMSNorm, SwiGLU, RoPE and linear+cross-entropy
    args = transformers.TrainingArguments(output_dir=str(OUT), **args)

    load = {"dtype": getattr(torch, JOB["dtype"])}
    if JOB["quantization"]:
        load["quantization_config"] = transformers.BitsAndBytesConfig.from_dict(JOB["quantization"])
    if not (HERE / "adapter" / "adapter_config.json").is_file():
        sys.exit(f"{HERE / 'adapter'} holds no adapter (adapter_config.json): export the job again from the notebook.")
    resume = "--resume" in sys.argv[1:]
    if resume and not any(OUT.glob("checkpoint-*")):
        sys.exit(f"--resume: there is no checkpoint in {OUT} yet; run without --resume to start.")
    base_path = str(HERE / JOB["base"]) if JOB["base_is_local"] else JOB["base"]
    base = getattr(transformers, JOB["auto_class"]).from_pretrained(base_path, **load)
    base.config.use_cache = False  # training never uses the KV cache
    model = PeftModel.from_pretrained(base, str(HERE / "adapter"), is_trainable=True)

    callbacks = []
    if JOB["early_stop"]:
        callbacks.append(transformers.EarlyStoppingCallback(early_stopping_patience=JOB["early_stop"]))
    if JOB["packing"]:  # one row per batch without padding; position_ids restart for every example
        collator = transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        collator = collate
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=read_jsonl("train.jsonl", required=True),
        eval_dataset=read_jsonl("eval.jsonl", required=False),
        data_collator=collator,
        compute_metrics=accuracy if JOB["task"] == "SEQ_CLS" else None,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(str(OUT / "adapter"))
    if trainer.is_world_process_zero():
        if (HERE / "tokenizer").is_dir():
            transformers.AutoTokenizer.from_pretrained(str(HERE / "tokenizer")).save_pretrained(str(OUT / "adapter"))
        state = trainer.state
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        print(json.dumps({
            "state": "finished" if state.global_step >= state.max_steps else "early_stopped",
            "step": state.global_step,
            "final_loss": losses[-1] if losses else None,
            "best_eval_loss": state.best_metric,
            "adapter": str(OUT / "adapter"),
        }), flush=True)
    return 0


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

# TrainingArguments fields that depend on the machine the job runs on: train.py sets them there.
_MACHINE_FIELDS = ("output_dir", "use_cpu", "bf16", "fp16", "dataloader_pin_memory", "disable_tqdm", "use_liger_kernel",
                   "per_device_train_batch_size", "per_device_eval_batch_size")  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(
                json.dumps({k: v for k, v in row.items() if k in ("input_ids", "labels", "label")}) + "\n"
            )


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    data: Any,
    *,
    tokenizer: Any = None,
    eval_data: Any = None,
    base: str | None = None,
    num_processes: int | None = None,
    trainer_args: dict | None = None,
    **train_settings: Any,
) -> ExportResult:
    """Write a standalone ``transformers.Trainer`` job for the adapter ``model`` holds, on ``data``, with
    ``train_settings`` (as for ``train``; ``trainer_args``: other ``TrainingArguments`` fields). ``base``: the model
    id or path the script loads (default: the model's own name or path; a model built from a config is saved into
    the job). The data is tokenized here, as a run in the notebook would; the job directory appears whole or not at
    all."""
    import torch

    from .adapters import save
    from .adapters.files import install_staged, os_error_message, stage_dir
    from .adapters.guards import require_adapters
    from .adapters.operations import unload_clean
    from .adapters.peft_facts import active_names
    from .data import find_tokenizer
    from .modelinfo import base_model_of
    from .train import make_train_config, prepare_for
    from .train.engine import checkpointing, trainer_fields
    from .train.run import TrainingRun
    from .transaction import Transaction

    peft_model = require_adapters(model, "export")
    config = make_train_config(**train_settings)  # validate now, not in the exported run
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"`directory` {str(target)!r} is a file; choose a new directory for the job.")
    if target.exists() and any(target.iterdir()):
        raise UsageError(
            f"`directory` {str(target)!r} exists and is not empty; choose a new directory for the job."
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(peft_model)
    prepared = prepare_for(peft_model, config, data, tokenizer, eval_data)
    if prepared.collator is not None:  # images or audio: the job's train.py reads tokenized text only
        raise UsageError(
            "`export` writes jobs for text data; this data holds images or audio, which the job's train.py cannot "
            "read. Train it here (%%lora train / jupyter_lora.train)."
        )
    # the machine the job runs on decides on Liger's kernels (train.py); here they only need to be a valid choice
    run = TrainingRun(
        peft_model, prepared, dataclasses.replace(config, kernels="none"), tokenizer, [], Path("runs")
    )
    fields = trainer_fields(
        run, torch.device("cpu"), checkpointing(config, peft_model), **(trainer_args or {})
    )
    base_model = base_model_of(peft_model)
    quantization = getattr(base_model.config, "quantization_config", None)

    stage = stage_dir(target)
    try:
        files = ["train.py", "job.json", "adapter/", "train.jsonl"]
        save(peft_model, stage / "adapter", name=active_names(peft_model)[0])
        source = base or getattr(base_model.config, "_name_or_path", "") or ""
        base_is_local = False
        if source and os.path.isdir(source):
            source = os.path.abspath(source)
        elif not source:
            # A model built from a config has no name to load it by: save the base (adapter taken off, then the
            # model restored exactly as it was by the transaction).
            transaction = Transaction(peft_model)
            with transaction:
                clean = unload_clean(peft_model)
                clean.save_pretrained(str(stage / "base"))
                transaction.restore()
            source, base_is_local = "base", True
            files.append("base/")
        _write_jsonl(stage / "train.jsonl", prepared.train)
        if prepared.eval:
            _write_jsonl(stage / "eval.jsonl", prepared.eval)
            files.append("eval.jsonl")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage / "tokenizer"))
            files.append("tokenizer/")
        dtype = next((p.dtype for p in base_model.parameters() if p.dtype.is_floating_point), torch.float32)
        job = {
            "base": source, "base_is_local": base_is_local, "auto_class": _auto_class(base_model),
            "dtype": str(dtype).replace("torch.", ""),
            "quantization": quantization.to_dict() if hasattr(quantization, "to_dict") else quantization,
            "task": prepared.task, "pad_token_id": prepared.pad_token_id, "packing": prepared.packing,
            "batch": config.batch, "precision": config.precision, "kernels": config.kernels,
            "early_stop": config.early_stop if prepared.eval else None,
            "training_arguments": {k: v for k, v in fields.items() if k not in _MACHINE_FIELDS},
        }  # fmt: skip
        (stage / "job.json").write_text(json.dumps(job, indent=1, default=str))
        (stage / "train.py").write_text(_TRAIN_PY)
        n = num_processes or max(2, torch.cuda.device_count())
        (stage / "accelerate_ddp.yaml").write_text(_DDP_YAML.format(n=n))
        (stage / "accelerate_fsdp.yaml").write_text(_FSDP_YAML.format(n=n, layer=_layer_class(base_model)))
        files += ["accelerate_ddp.yaml", "accelerate_fsdp.yaml", "README.md"]
        commands = (
            "python train.py",
            "accelerate launch --config_file accelerate_ddp.yaml train.py",
            "accelerate launch --config_file accelerate_fsdp.yaml train.py",
            "torchrun --nproc_per_node 2 train.py",
        )
        (stage / "README.md").write_text(
            "# Exported jupyter-lora training job\n\nA plain `transformers.Trainer` script; it needs torch, "
            "transformers and peft. Run from this directory:\n\n"
            + "\n".join(f"    {c}" for c in commands)
            + "\n\nThe first trains on one device (`python train.py --resume` continues from the last checkpoint in "
            "runs/); DDP runs one process per GPU (edit `num_processes`); FSDP shards a model that does not fit one "
            "GPU; the last runs two CPU processes (DDP over gloo, no GPU needed). The adapter is written to "
            "runs/adapter and loads with `PeftModel.from_pretrained(base, 'runs/adapter')` or "
            "`jupyter_lora.load(model, 'runs/adapter')`.\n"
        )
        if target.is_dir():  # an empty directory: the staged job takes its place
            target.rmdir()
        install_staged(stage, target)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        message = os_error_message(target, exc) if isinstance(exc, OSError) else None
        if message is not None:  # a full disk, a read-only file system, ...: one line, nothing written
            raise UsageError(message.replace("save to `path`", "write the job to `directory`", 1)) from None
        raise
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
