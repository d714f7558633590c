"""The training engine: LoRA training of a live model on a background thread, built on ``accelerate.Accelerator``
(device placement, mixed precision, DDP under ``accelerate launch``), reporting ``TrainingEvent``s to observers.

``train(model, data, ...)`` returns a ``TrainingRun`` at once; ``run.stop()`` finishes the current step, writes a
checkpoint and frees memory; ``resume(model)`` continues from the last checkpoint and reproduces the loss curve an
uninterrupted run would have had (same data order, RNG, optimizer and scheduler state). A CUDA out-of-memory
error is caught: memory is freed, the training state saved, the adapter left intact, advice reported.

Over 500 lines because the loop, its checkpoints and its stop/resume/OOM paths share one state (``_Engine``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..settings import TrainSettings, build
from . import runs
from .adapters.files import fsync_tree, install_staged
from .adapters.peft_facts import adapts_embeddings, is_quantized, wrapper_for
from .errors import UsageError
from .events import TrainingEvent
from .loss import chunked_causal_lm_loss
from .modelinfo import base_model_of, detect_task, param_count, require_module

__all__ = ["TrainConfig", "TrainingRun", "make_train_config", "resume", "train"]

# Training settings, declared with their help and checks in jupyter_lora.settings.
TrainConfig = TrainSettings


def make_train_config(**kwargs: Any) -> TrainConfig:
    """A validated ``TrainConfig``; unknown keys get a did-you-mean."""
    return build(TrainSettings, kwargs, "training setting")


# ------------------------------------------------------------------------------------------------ the run handle

_STATE_FILE = "trainer_state.pt"


class TrainingRun:
    """A training run on a background thread. ``stop()``, ``wait()``, ``history``, ``evals``, ``state``."""

    def __init__(self, model: nn.Module, data: Any, config: TrainConfig, tokenizer: Any, observers, output_dir: Path,
                 start: dict | None = None):  # fmt: skip
        self.model = model
        self.data = data
        self.config = config
        self.tokenizer = tokenizer
        self.output_dir = output_dir
        self.observers: list = list(observers)
        self.history: list[dict] = list(start["history"]) if start else []
        self.evals: list[dict] = list(start["evals"]) if start else []
        self.samples: list[dict] = []
        self.state = "created"
        self.error: BaseException | None = None
        self.checkpoint: Path | None = None
        self.best_eval_loss: float | None = start.get("best_eval_loss") if start else None
        self._start = start
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_observers: set[int] = set()
        self.total_steps = 0
        self.step = start["step"] if start else 0

    # --- control

    def stop(self, wait: bool = True, timeout: float | None = None) -> TrainingRun:
        """Finish the current step, save a checkpoint, free memory. With ``wait``, block until that is done."""
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._done.wait(timeout)
        return self

    def wait(self, timeout: float | None = None) -> TrainingRun:
        """Block until the run ends (or ``timeout`` seconds pass); re-raises a crash of the training thread."""
        self._done.wait(timeout)
        if self.state == "failed" and self.error is not None:
            raise self.error
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def running(self) -> bool:
        return self.state in ("running", "stopping")

    def add_observer(self, observer) -> None:
        self.observers.append(observer)

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        best = f", best eval {self.best_eval_loss:.4f}" if self.best_eval_loss is not None else ""
        return f"<TrainingRun {self.state}: step {self.step}/{self.total_steps}{loss}{best}>"

    # --- events

    def _emit(self, kind: str, epoch: float = 0.0, **data: Any) -> None:
        event = TrainingEvent(kind, self.step, self.total_steps, epoch, time.perf_counter() - self._t0, data)
        for observer in list(self.observers):
            if id(observer) in self._failed_observers:
                continue
            try:
                observer(event)
            except Exception as exc:  # a broken display must never stop training
                self._failed_observers.add(id(observer))
                warnings.warn(
                    f"A training observer failed and was detached: {exc!r}", RuntimeWarning, stacklevel=2
                )


# ------------------------------------------------------------------------------------------------ public functions


def _peft_of(model: nn.Module) -> nn.Module:
    require_module(model)
    peft_model = wrapper_for(model)
    if peft_model is None:
        raise UsageError(
            "This model has no LoRA adapter to train. Inject one first: model = jupyter_lora.inject(model, r=16) "
            "(or a %%lora model cell), then train."
        )
    return peft_model


def _task(peft_model: nn.Module, task: str) -> str:
    if task != "auto":
        key = str(task).upper()
        key = {"CAUSAL": "CAUSAL_LM", "CLASSIFICATION": "SEQ_CLS", "SEQ_CLASSIFICATION": "SEQ_CLS"}.get(
            key, key
        )
        if key not in ("CAUSAL_LM", "SEQ_CLS"):
            raise UsageError(f"`task` must be auto, causal_lm or seq_cls, got {task!r}.")
        return key
    detected = detect_task(peft_model).task_type
    if detected not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UsageError(
            f"Training here covers causal LMs and sequence classifiers; this model's task is {detected}. Set "
            "`task: causal_lm` or `task: seq_cls` if that is what it is."
        )
    return detected


def _default_output_dir(peft_model: nn.Module) -> Path:
    name = getattr(getattr(base_model_of(peft_model), "config", None), "model_type", None) or "model"
    return Path("lora_runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    eval_data: Any = None,
    observers: Any = (),
    background: bool = True,
    **settings: Any,
) -> TrainingRun:
    """Train the active LoRA adapter of ``model`` on ``data``; returns a ``TrainingRun`` at once (``background``)
    or when done. ``data``: texts, records (text | prompt+response | messages | text+label), a datasets.Dataset, a
    DataFrame, or a .jsonl/.json/.csv/.txt path. Settings: see ``TrainConfig`` (steps, epochs, lr, batch, seq,
    grad_accum, eval, eval_every, save_every, output_dir, packing, ckpt, samples, early_stop, keep_best, ...)."""
    from .data import find_tokenizer, prepare_data

    config = make_train_config(**settings)
    peft_model = _peft_of(model)
    base = base_model_of(peft_model)
    running = runs.active_run(base)
    if running is not None:
        raise UsageError(
            "This model is already training. Stop that run first (run.stop() or %lora stop model)."
        )
    task = _task(peft_model, config.task)
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(peft_model)
    label2id = getattr(base.config, "label2id", None) if task == "SEQ_CLS" else None
    prepared = prepare_data(
        data, tokenizer, task=task, seq=config.seq, eval=config.eval, eval_data=eval_data, packing=config.packing,
        seed=config.seed, label2id=label2id,
    )  # fmt: skip
    if config.samples and tokenizer is None:
        raise UsageError("`samples` need a tokenizer to generate with; pass tokenizer=.")
    output_dir = Path(config.output_dir) if config.output_dir else _default_output_dir(peft_model)
    run = TrainingRun(peft_model, prepared, config, tokenizer, _observer_list(observers), output_dir)
    return _launch(run, base, background)


def _observer_list(observers: Any) -> list:
    if observers is None:
        return []
    if callable(observers):
        return [observers]
    return list(observers)


def _launch(run: TrainingRun, base: nn.Module, background: bool) -> TrainingRun:
    runs.register(base, run)
    run.state = "running"
    if background:
        run._thread = threading.Thread(target=_Engine(run).run, name="jupyter-lora-train", daemon=True)
        run._thread.start()
    else:
        _Engine(run).run()
        if run.state == "failed" and run.error is not None:
            raise run.error
    return run


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-*`` directory under ``output_dir`` (None if there is none)."""
    root = Path(output_dir)
    found = sorted(p for p in root.glob("checkpoint-*") if (p / _STATE_FILE).exists())
    return found[-1] if found else None


def resume(
    model: nn.Module,
    checkpoint: str | os.PathLike | None = None,
    *,
    data: Any = None,
    tokenizer: Any = None,
    eval_data: Any = None,
    observers: Any = (),
    background: bool = True,
    **overrides: Any,
) -> TrainingRun:
    """Continue training ``model`` from ``checkpoint`` (default: the last one of its last run). The data, tokenizer
    and settings of that run are reused unless given; ``overrides`` may change e.g. ``steps``."""
    from .data import prepare_data

    peft_model = _peft_of(model)
    base = base_model_of(peft_model)
    running = runs.active_run(base)
    if running is not None:
        raise UsageError("This model is still training; stop it before resuming.")
    last = runs.last_run(base)
    if checkpoint is None:
        checkpoint = (last.checkpoint if last is not None else None) or (
            latest_checkpoint(last.output_dir) if last is not None else None
        )
        if checkpoint is None:
            raise UsageError(
                "No checkpoint to resume from: this model has no earlier run in this session. Give the checkpoint "
                "directory: resume(model, 'lora_runs/.../checkpoint-000100', data=...)."
            )
    path = Path(checkpoint)
    if path.is_dir() and not (path / _STATE_FILE).exists():
        inner = latest_checkpoint(path)
        path = inner if inner is not None else path
    if not (path / _STATE_FILE).exists():
        raise UsageError(f"`checkpoint` {str(path)!r} is not a training checkpoint (no {_STATE_FILE}).")
    state = torch.load(path / _STATE_FILE, map_location="cpu", weights_only=False)
    config = make_train_config(**{**state["config"], **overrides})
    if data is None:
        if last is None or last.data is None:
            raise UsageError(
                "`data` is needed to resume a run from another session: resume(model, ckpt, data=...)."
            )
        prepared = last.data
        tokenizer = tokenizer if tokenizer is not None else last.tokenizer
    else:
        task = _task(peft_model, config.task)
        label2id = getattr(base.config, "label2id", None) if task == "SEQ_CLS" else None
        prepared = prepare_data(
            data, tokenizer, task=task, seq=config.seq, eval=config.eval, eval_data=eval_data,
            packing=config.packing, seed=config.seed, label2id=label2id,
        )  # fmt: skip
    state["checkpoint_path"] = path
    output_dir = path.parent
    run = TrainingRun(
        peft_model, prepared, config, tokenizer, _observer_list(observers), output_dir, start=state
    )
    return _launch(run, base, background)


# ------------------------------------------------------------------------------------------------ the engine


class _Engine:
    """One run's training loop (runs on the run's thread)."""

    def __init__(self, run: TrainingRun):
        self.run_ = run
        self.cfg = run.config
        self.model = run.model

    # --- set-up ---------------------------------------------------------------------------------------------

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        cuda = torch.cuda.is_available() and _device_of(self.model).type == "cuda"
        precision = self.cfg.precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        state = AcceleratorState._shared_state
        if (
            state
            and state.get("_mixed_precision") not in (None, mixed)
            and int(os.environ.get("WORLD_SIZE", "1")) == 1
        ):
            # A notebook may train in bf16, then in fp32: accelerate keeps its first choice for the whole process
            # unless its (single-process) state is cleared.
            AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed, cpu=not cuda), precision

    def _optimizer(self, params: list[nn.Parameter]):
        cfg = self.cfg
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.optim in ("adamw8bit", "paged_adamw8bit", "paged_adamw"):
            from .quant import require_bitsandbytes

            bnb = require_bitsandbytes("8-bit and paged optimizers")
            cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
                   "paged_adamw": bnb.optim.PagedAdamW}[cfg.optim]  # fmt: skip
            return cls(groups, lr=cfg.lr)
        if cfg.optim == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
        if cfg.optim == "adafactor":
            from transformers.optimization import Adafactor

            # a fixed learning rate (the scheduler shapes it), as transformers' Trainer configures it
            return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)

    def _total_steps(self) -> tuple[int, int]:
        """(total optimizer steps, batches per epoch)."""
        per_epoch = self.run_.data.num_batches("train", self.cfg.batch)
        steps_per_epoch = max(1, math.ceil(per_epoch / self.cfg.grad_accum))
        total = self.cfg.steps or max(1, math.ceil(steps_per_epoch * self.cfg.epochs))
        return total, per_epoch

    # --- main -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        run = self.run_
        run._t0 = time.perf_counter()
        modes = [(m, m.training) for m in self.model.modules()]
        base = base_model_of(self.model)
        use_cache = getattr(getattr(base, "config", None), "use_cache", None)
        ckpt_was = _checkpointing_on(base)
        self.accelerator = None
        try:
            self._loop()
        except torch.OutOfMemoryError as exc:
            self._on_oom(exc)
        except Exception as exc:
            run.state = "failed"
            run.error = exc
            with contextlib.suppress(Exception):
                self._save_checkpoint("error")
            run._emit("error", message=str(exc), type=type(exc).__name__)
        finally:
            self._cleanup(modes, base, use_cache, ckpt_was)
            runs.finish(base)
            run._done.set()

    def _loop(self) -> None:
        run, cfg = self.run_, self.cfg
        accelerator, precision = self._accelerator()
        self.accelerator = accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UsageError("The active adapter has no trainable parameters (loaded with trainable=False?).")
        self._ckpt = cfg.ckpt is True or (cfg.ckpt == "auto" and is_quantized(self.model))
        if self._ckpt:
            base = base_model_of(self.model)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
            if getattr(base.config, "use_cache", None):
                base.config.use_cache = False
        total, per_epoch = self._total_steps()
        run.total_steps = total
        warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
        optimizer = self._optimizer(params)
        from transformers import get_scheduler

        scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        model, optimizer = accelerator.prepare(self.model, optimizer)
        self._chunked = self._use_chunked_loss(accelerator)
        self.prepared, self.optimizer, self.scheduler = model, optimizer, scheduler
        epoch, batch_index = 0, 0
        start = run._start
        if start is not None:
            self._restore(start, optimizer, scheduler)
            epoch, batch_index = start["epoch"], start["batch_index"]
        else:
            _seed_everything(cfg.seed)
        self._best_snapshot: dict[str, torch.Tensor] | None = None
        self._bad_evals = start.get("bad_evals", 0) if start else 0
        eval_every = cfg.eval_every or max(1, total // 10)
        log_every = cfg.log_every or (1 if accelerator.device.type == "cpu" else 5)
        device = accelerator.device
        trainable = sum(param_count(p) for p in params)
        run._emit(
            "start", epoch=epoch, total_steps=total, examples=len(run.data.train),
            eval_examples=len(run.data.eval or ()), trainable_params=trainable, task=run.data.task,
            config=asdict(cfg), device=str(device), precision=precision,
        )  # fmt: skip
        model.train()
        pending: list[tuple[int, torch.Tensor, float, int, float]] = []
        tokens_done = 0
        t_last = time.perf_counter()
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        while run.step < total:
            batches = run.data.batches("train", cfg.batch, epoch=epoch, seed=cfg.seed, start=batch_index)
            group: list[dict] = []
            for batch in batches:
                group.append(batch)
                batch_index += 1
                if len(group) < cfg.grad_accum and batch_index < per_epoch:
                    continue
                loss, tokens = self._step(model, optimizer, scheduler, group, device, params)
                group = []
                run.step += 1
                tokens_done += tokens
                ep = epoch + batch_index / per_epoch
                self._position = (epoch, batch_index)
                pending.append((run.step, loss, scheduler.get_last_lr()[0], tokens, ep))
                if run.step % log_every == 0 or run.step == total or run._stop.is_set():
                    t_last = self._flush(pending, t_last, tokens_done, cuda, device)
                    pending = []
                if run.step % eval_every == 0 and run.data.eval and run.step < total:
                    self._evaluate(model, ep)
                if cfg.sample_every and cfg.samples and run.step % cfg.sample_every == 0:
                    self._sample(ep)
                if cfg.save_every and run.step % cfg.save_every == 0 and run.step < total:
                    self._save_checkpoint("every")
                if run._stop.is_set() or run.step >= total or run.state == "early_stopped":
                    break
            else:
                epoch, batch_index = epoch + 1, 0
                self._position = (epoch, 0)
                continue
            break
        if pending:
            self._flush(pending, t_last, tokens_done, cuda, device)
        self._finish(model, epoch + batch_index / max(1, per_epoch), tokens_done)

    def _use_chunked_loss(self, accelerator) -> bool:
        from .loss import supports_chunked_loss

        setting = self.cfg.chunked_loss
        possible = (
            self.run_.data.task == "CAUSAL_LM"
            and accelerator.num_processes == 1
            and supports_chunked_loss(self.model)
        )
        if setting is True and not possible:
            raise UsageError(
                "`chunked_loss: true` works for single-process causal-LM training of "
                "llama/mistral/qwen2/qwen3/phi3/gemma-style models; set it to auto or false here."
            )
        return possible if setting == "auto" and accelerator.device.type == "cuda" else bool(setting is True)

    def _step(self, model, optimizer, scheduler, group, device, params) -> tuple[torch.Tensor, int]:
        """One optimizer step over ``group`` micro-batches. Loss terms are weighted by their label tokens (or
        examples for classification) so accumulation equals one big batch. No host sync here."""
        accelerator = self.accelerator
        if accelerator.num_processes > 1:  # DDP: each process takes its share of every batch's examples
            group = [_shard(b, accelerator.process_index, accelerator.num_processes) for b in group]
        weights = [_label_count(b) for b in group]
        total_weight = sum(weights) or 1
        tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in group
        )
        loss_sum = torch.zeros((), device=device)
        for i, (batch, weight) in enumerate(zip(group, weights, strict=True)):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sync = i == len(group) - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
            with ctx:
                if self._chunked:
                    with accelerator.autocast():
                        raw = chunked_causal_lm_loss(self.model, batch)
                else:
                    raw = model(**batch, **self.run_.data.forward_kwargs).loss
                loss = raw * (weight / total_weight)
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        if self.cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, tokens

    def _flush(self, pending, t_last, tokens_done, cuda, device) -> float:
        """Turn pending step losses into numbers (the only host sync) and emit step events."""
        run = self.run_
        now = time.perf_counter()
        losses = torch.stack([p[1] for p in pending]).tolist()
        window_tokens = sum(p[3] for p in pending)
        tps = window_tokens / max(now - t_last, 1e-9)
        elapsed = now - run._t0
        done = run.step
        remaining = run.total_steps - done
        eta = elapsed / max(1, done - (run._start["step"] if run._start else 0)) * remaining
        mem = torch.cuda.memory_allocated(device) if cuda else None
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        for (step, _, lr, tokens, ep), loss in zip(pending, losses, strict=True):
            record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "epoch": ep, "time": elapsed}
            run.history.append(record)
            run.step = step
            run._emit("step", epoch=ep, loss=loss, lr=lr, tokens=tokens, tokens_per_s=tps, elapsed=elapsed,
                      eta=eta, memory_allocated=mem, memory_peak=peak, grad_norm=None)  # fmt: skip
        run.step = done
        return now

    # --- eval, samples, checkpoints ------------------------------------------------------------------------

    def _evaluate(self, model, epoch: float) -> None:
        run, cfg = self.run_, self.cfg
        model.eval()
        total_loss, total_weight, correct, count = 0.0, 0, 0, 0
        device = self.accelerator.device
        with torch.no_grad():
            for batch in run.data.batches("eval", cfg.batch, epoch=0, seed=cfg.seed, shuffle=False):
                weight = _label_count(batch)
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch, **run.data.forward_kwargs)
                total_loss += float(out.loss) * weight
                total_weight += weight
                if run.data.task == "SEQ_CLS":
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                    count += int(batch["labels"].numel())
        model.train()
        eval_loss = total_loss / max(1, total_weight)
        improved = run.best_eval_loss is None or eval_loss < run.best_eval_loss
        if improved:
            run.best_eval_loss = eval_loss
            self._bad_evals = 0
            if self._keep_best():
                self._best_snapshot = {
                    n: p.detach().to("cpu", copy=True)
                    for n, p in self.model.named_parameters()
                    if p.requires_grad
                }
                self._best_step = run.step
        else:
            self._bad_evals += 1
        record = {"step": run.step, "eval_loss": eval_loss, "epoch": epoch}
        accuracy = correct / count if count else None
        if accuracy is not None:
            record["accuracy"] = accuracy
        run.evals.append(record)
        run._emit("eval", epoch=epoch, eval_loss=eval_loss, accuracy=accuracy, best_eval_loss=run.best_eval_loss,
                  improved=improved)  # fmt: skip
        if cfg.early_stop and self._bad_evals >= cfg.early_stop:
            run.state = "early_stopped"

    def _keep_best(self) -> bool:
        return self.cfg.keep_best if self.cfg.keep_best is not None else bool(self.cfg.early_stop)

    def _sample(self, epoch: float) -> None:
        run = self.run_
        if run.data.task != "CAUSAL_LM" or run.tokenizer is None:
            return
        model = self.model
        model.eval()
        out = []
        try:
            for prompt in self.cfg.samples:
                inputs = run.tokenizer(prompt, return_tensors="pt")
                inputs = {
                    k: v.to(self.accelerator.device)
                    for k, v in inputs.items()
                    if k in ("input_ids", "attention_mask")
                }
                pad = (
                    run.tokenizer.pad_token_id
                    if run.tokenizer.pad_token_id is not None
                    else run.tokenizer.eos_token_id
                )
                with torch.no_grad():
                    ids = model.generate(
                        **inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False, pad_token_id=pad
                    )
                text = run.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                out.append({"prompt": prompt, "text": text})
        finally:
            model.train()
        run.samples.append({"step": run.step, "samples": out})
        run._emit("sample", epoch=epoch, samples=out)

    def _save_checkpoint(self, reason: str) -> Path | None:
        """Adapter (PEFT format) + optimizer + scheduler + RNG + step + data position, written to a temporary
        directory beside the target and renamed into place."""
        run = self.run_
        if getattr(self, "optimizer", None) is None:
            return None
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:  # one process writes; the weights are the same on all
                return None
        root = Path(run.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"checkpoint-{run.step:06d}"
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=root))
        try:
            name = _active_name(self.model)
            embeddings = True if adapts_embeddings(self.model, name) else "auto"
            self.model.save_pretrained(
                str(stage / "adapter"), selected_adapters=[name], safe_serialization=True,
                save_embedding_layers=embeddings,
            )  # fmt: skip
            if name != "default":
                inner = stage / "adapter" / name
                for item in inner.iterdir():
                    item.rename(stage / "adapter" / item.name)
                inner.rmdir()
            epoch, batch_index = getattr(self, "_position", (0, 0))
            state = {
                "step": run.step, "epoch": epoch, "batch_index": batch_index, "config": asdict(self.cfg),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(), "history": run.history, "evals": run.evals,
                "best_eval_loss": run.best_eval_loss, "bad_evals": getattr(self, "_bad_evals", 0),
                "adapter_name": name, "reason": reason,
            }  # fmt: skip
            torch.save(state, stage / _STATE_FILE)
            (stage / "trainer_state.json").write_text(json.dumps(
                {k: state[k] for k in ("step", "epoch", "batch_index", "best_eval_loss", "reason")}, indent=1))  # fmt: skip
            fsync_tree(stage)
            install_staged(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        run.checkpoint = final
        self._prune(root, final)
        run._emit("checkpoint", path=str(final), reason=reason)
        return final

    def _prune(self, root: Path, keep: Path) -> None:
        checkpoints = sorted(p for p in root.glob("checkpoint-*") if p.is_dir())
        for old in checkpoints[: max(0, len(checkpoints) - self.cfg.keep_checkpoints)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _restore(self, state: dict, optimizer, scheduler) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(state["checkpoint_path"])
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
        name = _active_name(self.model)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self._position = (state["epoch"], state["batch_index"])

    # --- endings --------------------------------------------------------------------------------------------

    def _finish(self, model, epoch: float, tokens: int) -> None:
        run = self.run_
        if run.data.eval and (not run.evals or run.evals[-1]["step"] != run.step):
            self._evaluate(model, epoch)
        if (
            self._best_snapshot is not None
            and self._keep_best()
            and getattr(self, "_best_step", run.step) != run.step
        ):
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self._best_snapshot:
                        p.copy_(self._best_snapshot[n].to(p.device))
        stopped = run._stop.is_set() or run.state == "early_stopped"
        reason = "early_stop" if run.state == "early_stopped" else "user"
        path = self._save_checkpoint("stop" if stopped else "end")
        if stopped:
            run.state = "stopped" if reason == "user" else "early_stopped"
            run._emit("stop", epoch=epoch, reason=reason, checkpoint=str(path) if path else None)
        else:
            run.state = "finished"
        elapsed = time.perf_counter() - run._t0
        final_loss = run.history[-1]["loss"] if run.history else None
        run._emit("end", epoch=epoch, steps=run.step, final_loss=final_loss, best_eval_loss=run.best_eval_loss,
                  elapsed=elapsed, tokens=tokens, tokens_per_s=tokens / max(elapsed, 1e-9),
                  checkpoint=str(path) if path else None, state=run.state)  # fmt: skip

    def _on_oom(self, exc: BaseException) -> None:
        run, cfg = self.run_, self.cfg
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = None
        with contextlib.suppress(Exception):
            path = self._save_checkpoint("oom")
        tips = []
        if cfg.batch > 1:
            tips.append(f"batch: {max(1, cfg.batch // 2)} with grad_accum: {cfg.grad_accum * 2}")
        if cfg.seq > 256:
            tips.append(f"seq: {cfg.seq // 2}")
        if not getattr(self, "_ckpt", False):
            tips.append("ckpt: true")
        if not is_quantized(self.model):
            tips.append("a 4-bit base (%lora base VAR ID --4bit)")
        advice = "Out of GPU memory at step {}. The adapter and model are intact{}. Try {}.".format(
            run.step + 1, f"; state saved in {path}" if path else "", "; ".join(tips) or "a smaller model"
        )
        run.state = "oom"
        run.error = None
        run._emit("oom", message=str(exc).splitlines()[0] if str(exc) else "CUDA out of memory", advice=advice,
                  checkpoint=str(path) if path else None)  # fmt: skip
        run._emit("end", steps=run.step, final_loss=run.history[-1]["loss"] if run.history else None,
                  best_eval_loss=run.best_eval_loss, elapsed=time.perf_counter() - run._t0, tokens=0, tokens_per_s=0.0,
                  checkpoint=str(path) if path else None, state="oom")  # fmt: skip

    def _cleanup(self, modes, base, use_cache, ckpt_was) -> None:
        accelerator = self.accelerator
        if accelerator is not None:
            with contextlib.suppress(Exception):
                accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        if getattr(self, "_ckpt", False) and not ckpt_was:
            with contextlib.suppress(Exception):
                base.gradient_checkpointing_disable()
                self.model.disable_input_require_grads()
        if use_cache is not None and getattr(base, "config", None) is not None:
            base.config.use_cache = use_cache
        for module, mode in modes:
            module.training = mode
        self.optimizer = None
        self.scheduler = None
        self.prepared = None
        if accelerator is not None:
            with contextlib.suppress(Exception):
                accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shard(batch: dict, rank: int, world: int) -> dict:
    """This process's rows of a padded batch (rows rank, rank + world, ...)."""
    rows = batch["input_ids"].shape[0]
    if "position_ids" in batch and rows == 1:
        raise UsageError("`packing` is not supported with several processes yet; set packing: false.")
    if rows < world:
        raise UsageError(f"`batch` ({rows}) must be at least the number of processes ({world}).")
    return {k: v[rank::world] for k, v in batch.items()}


def _label_count(batch: dict) -> int:
    labels = batch.get("labels")
    if labels is None:
        return int(batch["input_ids"].shape[0])
    if labels.ndim == 1:  # classification: one label per example
        return int(labels.numel())
    # causal LM: transformers shifts labels by one inside the loss, so the first position never counts
    return max(1, int((labels[..., 1:] != -100).sum()))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _active_name(peft_model: nn.Module) -> str:
    active = peft_model.active_adapter
    return active if isinstance(active, str) else active[0]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def last_run(model: nn.Module) -> TrainingRun | None:
    """The most recent training run of ``model`` in this session (running or not), or None."""
    require_module(model)
    peft_model = wrapper_for(model)
    return runs.last_run(peft_model if peft_model is not None else model)


__all__ += ["last_run", "latest_checkpoint"]


def _checkpointing_on(base: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(base)):
            return bool(getattr(base, name))
    return False
