"""``RunCallback``: the one event source. A ``transformers.TrainerCallback`` that turns the Trainer's events into
``TrainingEvent``s on the run (start, step, eval, sample, checkpoint), asks the Trainer to stop and checkpoint when
the user presses Stop, and keeps the run's history. Observers — the progress widget, the text output, a user's own
callable — only ever see the run's events."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from .run import TrainingRun

__all__ = ["SETTINGS_FILE", "RunCallback", "write_settings"]

SETTINGS_FILE = "jupyter_lora.json"


class RunCallback(TrainerCallback):
    """Reports the Trainer's progress to ``run`` and carries ``run.stop()`` to the Trainer."""

    def __init__(self, run: TrainingRun, tokens: list[int], device: torch.device):
        self.run = run
        self.tokens = (
            tokens  # tokens per batch, appended by the collator (counted on the host: no device sync)
        )
        self.device = device
        self.cuda = device.type == "cuda"
        self._tokens_logged = 0
        self._t_last = time.perf_counter()
        self._first_step = 0

    # --- the run's clock and position

    def _sync(self, state) -> None:
        self.run.step = int(state.global_step)
        self.run.epoch = float(state.epoch or 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        run = self.run
        self._sync(state)
        self._first_step = run.step
        run.total_steps = int(state.max_steps)
        self._t_last = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        run.emit("start", total_steps=run.total_steps, examples=len(run.data.train),
                 eval_examples=len(run.data.eval or ()), trainable_params=trainable, task=run.data.task,
                 config=asdict(run.config), device=str(self.device), precision=run.precision,
                 resumed_from=str(run.resume_from) if run.resume_from else None)  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        run = self.run
        logs = logs or {}
        self._sync(state)
        if "loss" in logs and "eval_loss" not in logs:
            now = time.perf_counter()
            # batches are collated ahead of use (prefetch): count those the finished steps consumed
            consumed = (run.step - self._first_step) * args.gradient_accumulation_steps
            tokens = sum(self.tokens[self._tokens_logged : consumed])
            self._tokens_logged = max(self._tokens_logged, consumed)
            elapsed = now - run.started
            done = max(1, run.step - self._first_step)
            eta = elapsed / done * max(0, run.total_steps - run.step)
            record = {"step": run.step, "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
                      "tokens": tokens, "epoch": run.epoch, "time": elapsed}  # fmt: skip
            run.history.append(record)
            grad_norm = logs.get("grad_norm")
            run.emit("step", loss=record["loss"], lr=record["lr"], tokens=tokens,
                     tokens_per_s=tokens / max(now - self._t_last, 1e-9), elapsed=elapsed, eta=eta,
                     memory_allocated=torch.cuda.memory_allocated(self.device) if self.cuda else None,
                     memory_peak=torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
                     grad_norm=None if grad_norm is None else float(grad_norm))  # fmt: skip
            self._t_last = now
            if run.stop_requested.is_set():  # Stop pressed while this step was reported: it is the last one
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
        if cfg.sample_every and cfg.samples and run.step % cfg.sample_every == 0:
            self.sample(model)
        if run.stop_requested.is_set():
            control.should_log = True
            self._stop(control)
        elif run.step >= run.total_steps:
            control.should_save = True  # the finished run's last state is a checkpoint too
        return control

    @staticmethod
    def _stop(control) -> None:
        control.should_save = True
        control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        run = self.run
        self._sync(state)
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            if state.is_world_process_zero:  # the settings, so that resume needs only the checkpoint and data
                write_settings(path, run)
            run.checkpoint = path
            reason = (
                "stop" if run.stop_requested.is_set() else ("end" if run.step >= run.total_steps else "every")
            )
            run.emit("checkpoint", path=str(path), reason=reason)

    # --- samples

    def sample(self, model) -> None:
        run = self.run
        if run.data.task != "CAUSAL_LM" or run.tokenizer is None or model is None:
            return
        tokenizer = run.tokenizer
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
