"""``RunCallback``: the one event source. A ``transformers.TrainerCallback`` that turns the Trainer's events into
``TrainingEvent``s on a ``TrainingRun`` (start, step, eval, sample, checkpoint, stop, end), asks the Trainer to stop
and checkpoint when the user presses Stop, and keeps the run's history. Observers — the progress widget, the text
output, a user's own callable — only ever see the run's events.

The same callback serves this package's runs and a user's own ``Trainer`` (``jupyter_lora.ProgressCallback``):
there the run is made from what the Trainer passes to its callbacks (model, data loader, arguments)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import UsageError
from . import devicestats
from .run import TrainingRun

__all__ = ["SETTINGS_FILE", "RunCallback", "observed_run", "write_settings"]

SETTINGS_FILE = "jupyter_lora.json"
_NO_STATS = ("memory_allocated", "memory_peak", "memory_capacity", "gpu_utilization")


class RunCallback(TrainerCallback):
    """Reports the Trainer's progress to ``run`` and carries ``run.stop()`` to the Trainer.

    ``tokens``: tokens per batch, appended by this package's collator (counted on the host: no device sync). Without
    it (a user's own Trainer) tokens come from ``state.num_input_tokens_seen`` when the Trainer counts them.
    ``device``: where the model trains; found from the model when not given. Its memory (and utilisation) come from
    ``devicestats.provider_for(device)`` — on CUDA the torch.cuda counters, read on logging steps at most every
    ``stats_interval`` seconds; on a CPU nothing is read and the step events say None.
    """

    stats_interval = devicestats.STATS_INTERVAL

    def __init__(self, run: TrainingRun, tokens: list[int] | None = None, device: torch.device | None = None):
        self.run = run
        self.tokens = tokens
        self.device = device
        self._tokens_logged = 0
        self._tokens_seen = 0
        self._t_last = time.perf_counter()
        self._first_step = 0
        self._train_loss: float | None = None
        self._stats: devicestats.StatsSampler | None = None

    # --- the run's clock and position

    def _sync(self, state) -> None:
        self.run.step = int(state.global_step or 0)
        self.run.epoch = float(state.epoch or 0.0)

    def _device_stats(self, force: bool = False) -> dict[str, Any]:
        """The device's memory and utilisation for an event: a new reading, {} when the last one is more recent
        than ``stats_interval`` (the event then leaves the fields out), all None where there is nothing to read."""
        if self._stats is None:
            return dict.fromkeys(_NO_STATS)
        try:
            return self._stats.sample(force)
        except Exception:  # a statistics source that fails is dropped: the run goes on without its figures
            self._stats = None
            return dict.fromkeys(_NO_STATS)

    def _start_stats(self) -> None:
        provider = devicestats.provider_for(self.device)
        if provider is not None:
            provider.reset_peak()
            self._stats = devicestats.StatsSampler(provider, self.stats_interval)

    def _eta(self, now: float) -> float:
        run = self.run
        done = max(1, run.step - self._first_step)
        return (now - run.started) / done * max(0, run.total_steps - run.step)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        run = self.run
        self._sync(state)
        self._first_step = run.step
        run.total_steps = int(state.max_steps or 0)
        self._t_last = time.perf_counter()
        if run.data is None:  # a user's own Trainer: the run is what the Trainer hands its callbacks
            run.started = self._t_last
            run.state = "running"
            run.model = model if model is not None else run.model
            self._tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            dataset = getattr(train_dataloader, "dataset", None)
            examples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
            info = {"examples": examples, "eval_examples": None, "task": None, "precision": None,
                    "config": {"learning_rate": args.learning_rate, "batch": args.per_device_train_batch_size,
                               "grad_accum": args.gradient_accumulation_steps}}  # fmt: skip
        else:
            info = {"examples": len(run.data.train), "eval_examples": len(run.data.eval or ()),
                    "task": run.data.task, "precision": run.precision, "unit": run.data.unit,
                    "config": asdict(run.config) if is_dataclass(run.config) else dict(run.config or {})}  # fmt: skip
        if self.device is None and run.model is not None:
            self.device = next((p.device for p in run.model.parameters()), torch.device("cpu"))
        self._start_stats()
        trainable = (
            sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            if run.model is not None
            else None
        )
        # a resumed run's chart continues the curve before its checkpoint (copies: the lists grow on this thread)
        earlier = {"history": list(run.history), "evals": list(run.evals)} if run.resume_from else {}
        run.emit("start", total_steps=run.total_steps, trainable_params=trainable,
                 device=None if self.device is None else str(self.device),
                 resumed_from=str(run.resume_from) if run.resume_from else None,
                 **self._device_stats(force=True), **earlier, **info)  # fmt: skip

    def _step_tokens(self, args, state) -> int | None:
        """Tokens the steps since the last report consumed."""
        run = self.run
        if self.tokens is None:
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            tokens, self._tokens_seen = seen - self._tokens_seen, seen
            return tokens if seen else None
        # batches are collated ahead of use (prefetch): count those the finished steps consumed
        consumed = (run.step - self._first_step) * args.gradient_accumulation_steps
        tokens = sum(self.tokens[self._tokens_logged : consumed])
        self._tokens_logged = max(self._tokens_logged, consumed)
        return tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        run = self.run
        logs = logs or {}
        self._sync(state)
        if "train_loss" in logs:  # the Trainer's summary at the end of train()
            self._train_loss = float(logs["train_loss"])
        if "loss" in logs and "eval_loss" not in logs:
            now = time.perf_counter()
            tokens = self._step_tokens(args, state)
            elapsed = now - run.started
            grad_norm = logs.get("grad_norm")
            lr = logs.get("learning_rate")
            record = {"step": run.step, "loss": float(logs["loss"]), "lr": None if lr is None else float(lr),
                      "tokens": tokens or 0, "epoch": run.epoch, "time": elapsed}  # fmt: skip
            run.history.append(record)
            run.emit("step", loss=record["loss"], lr=record["lr"], tokens=tokens, elapsed=elapsed,
                     tokens_per_s=None if tokens is None else tokens / max(now - self._t_last, 1e-9),
                     eta=self._eta(now), grad_norm=None if grad_norm is None else float(grad_norm),
                     **self._device_stats())  # fmt: skip
            self._t_last = now
            if not math.isfinite(record["loss"]):
                self._diverged(control, record["loss"])
            elif run.stop_requested.is_set():  # Stop pressed while this step was reported: it is the last one
                self._stop(control)
        if "eval_loss" in logs:
            eval_loss = float(logs["eval_loss"])
            improved = run.best_eval_loss is None or eval_loss < run.best_eval_loss
            if improved:
                run.best_eval_loss = eval_loss
            record = {"step": run.step, "eval_loss": eval_loss, "epoch": run.epoch}
            accuracy = logs.get("eval_accuracy")
            if accuracy is not None:
                record["accuracy"] = float(accuracy)
            run.evals.append(record)
            run.emit("eval", eval_loss=eval_loss, accuracy=record.get("accuracy"),
                     best_eval_loss=run.best_eval_loss, improved=improved)  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        run = self.run
        self._sync(state)
        cfg = run.config
        if getattr(cfg, "sample_every", None) and cfg.samples and run.step % cfg.sample_every == 0:
            self.sample(model)
        if run.stop_requested.is_set():
            control.should_log = True
            self._stop(control)
        elif run.step >= run.total_steps or control.should_training_stop:
            control.should_save = (
                True  # the last state of a finished (or otherwise stopped) run is a checkpoint
            )
        elif not control.should_log:  # no log follows this step: report the position alone
            run.emit("step", elapsed=time.perf_counter() - run.started, eta=self._eta(time.perf_counter()))
        return control

    def _diverged(self, control, loss: float) -> None:
        """A NaN/inf loss: the adapter it produced is not saved over the last good checkpoint, and the run ends."""
        run = self.run
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True
        last = f"; the last checkpoint ({run.checkpoint}) holds the state before it" if run.checkpoint else ""
        run.diverged = (
            f"The loss became {loss} at step {run.step}: training stopped and this state was not saved{last}. "
            "Lower lr (or max_grad_norm), check the data, or use bf16 instead of fp16."
        )

    @staticmethod
    def _stop(control) -> None:
        control.should_save = True
        control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        run = self.run
        self._sync(state)
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            if state.is_world_process_zero and is_dataclass(run.config):
                # the settings, so that resume needs only the checkpoint and data
                write_settings(path, run)
            run.checkpoint = path
            run.emit("checkpoint", path=str(path), reason=self._save_reason(control))

    def _save_reason(self, control) -> str:
        """Why this checkpoint was written, said the way the run's outcome will be (``on_train_end``): "end" when
        the planned steps are done (a Stop that came later changed nothing), "stop" when it is the last one of a
        run that stops early (Stop, early stopping, another callback's stop), else "every"."""
        if self._all_steps_done():
            return "end"
        return "stop" if control.should_training_stop else "every"

    def _all_steps_done(self) -> bool:
        return self.run.step >= self.run.total_steps

    def on_train_end(self, args, state, control, **kwargs):
        """The run's outcome: finished (every planned step done, even when Stop was pressed after the last one),
        stopped (Stop pressed) or early-stopped (fewer steps than planned)."""
        run = self.run
        self._sync(state)
        checkpoint = str(run.checkpoint) if run.checkpoint else None
        if run.diverged:
            run.state = "failed"
            run.error = UsageError(run.diverged)
            run.emit("error", message=run.diverged, type="UsageError")
        elif self._all_steps_done():
            run.state = "finished"
        elif run.stop_requested.is_set():
            run.state = "stopped"
            run.emit("stop", reason="user", checkpoint=checkpoint)
        else:
            run.state = "early_stopped"
            run.emit("stop", reason="early_stop", checkpoint=checkpoint)
        elapsed = run.elapsed()
        if self.tokens is None:
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        else:
            tokens = sum(h["tokens"] for h in run.history)
        final = run.history[-1]["loss"] if run.history else self._train_loss
        peak = self._device_stats(force=True).get("memory_peak")
        run.emit("end", steps=run.step, final_loss=final, best_eval_loss=run.best_eval_loss, elapsed=elapsed,
                 tokens=tokens, tokens_per_s=tokens / max(elapsed, 1e-9), checkpoint=checkpoint,
                 state=run.state, memory_peak=peak)  # fmt: skip

    # --- samples

    def sample(self, model) -> None:
        run = self.run
        if run.data is None or run.data.task != "CAUSAL_LM" or run.tokenizer is None or model is None:
            return
        from ..data.processors import text_tokenizer

        tokenizer = text_tokenizer(run.tokenizer)  # a vision-language model's processor: its tokenizer
        was_training = model.training
        model.eval()
        out = []
        try:
            device = next(p.device for p in model.parameters())
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            for prompt in run.config.samples:
                inputs = tokenizer(prompt, return_tensors="pt")
                inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=run.config.max_new_tokens, do_sample=False,
                                         pad_token_id=pad)  # fmt: skip
                text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                out.append({"prompt": prompt, "text": text})
        finally:
            model.train(was_training)
        run.samples.append({"step": run.step, "samples": out})
        run.emit("sample", samples=out)


def write_settings(path: Path, run: TrainingRun) -> None:
    """``jupyter_lora.json`` in a checkpoint: the run's settings, so that a resume needs only the checkpoint."""
    (path / SETTINGS_FILE).write_text(json.dumps({"config": asdict(run.config)}, indent=1, default=str))


def observed_run(observers: list[Any]) -> TrainingRun:
    """A run for a user's own ``Trainer``: filled in by ``RunCallback`` from the Trainer's hooks."""
    return TrainingRun(None, None, None, None, observers, Path("."))  # type: ignore[arg-type]
