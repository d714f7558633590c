"""Sweeps: several training runs of one model compared in one call — LoRA settings, full fine-tuning, the task
head alone and PEFT's other methods — on the same prepared data, eval split and seed, each from the same base
weights (kept on the CPU and put back bit for bit between runs).

``sweep(model, data, grid={...}, runs=[...], ...)`` returns a ``Sweep`` at once (``background``); ``.wait()``,
``.stop()``, ``.table`` (a ``SweepTable``), ``.model`` (what the model variable should hold afterwards: a
PeftModel when an adapter is kept). ``resume_sweep(model)`` continues a stopped sweep.

Event contract (for live views such as a leaderboard): observers are callables ``observer(event)`` given
``SweepEvent(kind, index, name, data)``; ``index``/``name`` are the run's (None for sweep-wide events). Kinds:

============ ==========================================================================================
sweep_start  planned: list of {index, name, method, settings}; varying: the settings that differ; sweep_dir;
             metric; rows: the table's rows so far (finished ones of a resumed sweep, the rest "pending");
             curves: {index: [[step, loss], ...]} of the runs that ended before (a resumed sweep); note: the
             settings a method does not use, dropped from its runs ('' when none)
run_start    settings (this run's), method
train        event: the run's ``TrainingEvent`` (see ``core/events.py``: start, step, eval, ..., end)
run_end      row: the run's finished row (COLUMNS of ``table.py`` and the varying settings)
sweep_end    state (finished | stopped | failed), table (the ``SweepTable``), best (row or None), best_by (what
             "best" was judged by, in words: ``SweepTable.best_label``), kept (what the
             model holds: list of adapter names, "weights of RUN", or []), not_kept ({run: reason})
============ ==========================================================================================

Events come from the sweep's thread; an observer that raises is detached with a warning. Row ``status``:
"pending", "running", "finished", "stopped" (its checkpoint resumes), "not run", or "failed: <one line>".
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ...settings import KEEP, SETTINGS, canonical, keys, name_of
from .. import runs as run_registry
from ..errors import UsageError, did_you_mean
from ..modelinfo import base_model_of, require_module
from .grid import PlannedRun, plan, sweep_keys, varying_settings
from .methods import (
    LORA_FAMILY,
    BaseSnapshot,
    applies,
    check_method,
    counts,
    load_adapter,
    load_weights,
    save_run,
    unwrap,
    wrap,
)
from .table import SweepTable

__all__ = [
    "Sweep",
    "SweepEvent",
    "SweepTable",
    "last_sweep",
    "resume_sweep",
    "sweep",
    "sweep_keys",
    "text_observer",
]

SWEEP_FILE = "sweep.json"
_LAST: weakref.WeakKeyDictionary[nn.Module, Sweep] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SweepEvent:
    """One thing that happened in a sweep (see the module's docstring for kinds and data)."""

    kind: str
    index: int | None
    name: str | None
    data: dict = field(default_factory=dict)


class Sweep:
    """A sweep on a background thread: ``stop()``, ``wait()``, ``table``, ``model``, ``state``, ``sweep_dir``."""

    def __init__(self, base, planned, prepared, tokenizer, shared_train, sweep_dir, keep, metric, observers,
                 trainer_args, rows=None, resume=None, note="", data_id=None, curves=None):  # fmt: skip
        self.base = base
        self.planned: list[PlannedRun] = planned
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.shared_train = shared_train
        self.sweep_dir = Path(sweep_dir)
        self.keep = keep
        self.metric = metric
        self.observers = list(observers)
        self.trainer_args = trainer_args
        self.varying = _varying(planned)
        self.rows = rows or [_pending(p, self.varying) for p in planned]
        self.resume = resume or {}  # index -> checkpoint path to continue from
        self.note = note  # the settings a method does not use, dropped from its runs
        self.data_id = data_id  # what the runs train and evaluate on (``_data_id``)
        self.curves: dict[int, list] = dict(curves or {})  # index -> [[step, loss], ...] of each ended run
        self.state = "created"
        self.model: nn.Module = base
        self.current = None  # the TrainingRun of the run in progress
        self.kept: list = []
        self.not_kept: dict[str, str] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.thread: threading.Thread | None = None
        self._failed_observers: set[int] = set()

    # --- control

    def stop(self, wait: bool = True, timeout: float | None = None) -> Sweep:
        """Stop the run in progress (it finishes its step and checkpoints) and end the sweep; the runs not started
        are "not run". ``resume_sweep(model)`` continues."""
        self._stop.set()
        run = self.current
        if run is not None:
            run.stop(wait=False)
        if wait:
            self.wait(timeout)
        return self

    def wait(self, timeout: float | None = None) -> Sweep:
        self.finished.wait(timeout)
        if (
            self.thread is not None
            and self.thread is not threading.current_thread()
            and self.finished.is_set()
        ):
            self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    @property
    def table(self) -> SweepTable:
        return SweepTable(self.rows, self.varying, self.metric, note=self.note)

    def progress_text(self) -> str:
        """``run 2/6``: where the sweep is, for messages."""
        running = [i for i, r in enumerate(self.rows) if r["status"] == "running"]
        return f"run {running[0] + 1}/{len(self.rows)}" if running else f"{len(self.rows)} runs"

    @property
    def best(self) -> dict | None:
        return self.table.best

    def __repr__(self) -> str:
        done = sum(r["status"] == "finished" for r in self.rows)
        return f"<Sweep {self.state}: {done}/{len(self.rows)} runs finished, {self.sweep_dir}>"

    def _repr_html_(self) -> str:
        return self.table._repr_html_()

    # --- events

    def emit(self, kind: str, index: int | None = None, name: str | None = None, **data: Any) -> None:
        event = SweepEvent(kind, index, name, data)
        for observer in list(self.observers):
            if id(observer) in self._failed_observers:
                continue
            try:
                observer(event)
            except Exception as exc:  # a broken display never stops a sweep
                self._failed_observers.add(id(observer))
                warnings.warn(
                    f"A sweep observer failed and was detached: {exc!r}", RuntimeWarning, stacklevel=2
                )

    # --- the sweep

    def run(self) -> None:
        snapshot = BaseSnapshot(self.base)
        self.state = "running"
        try:
            self.emit("sweep_start", planned=[{"index": p.index, "name": p.name, "method": p.method,
                                               "settings": _plain(p.settings)} for p in self.planned],
                      varying=list(self.varying), sweep_dir=str(self.sweep_dir), metric=self.metric,
                      rows=[dict(r) for r in self.rows], note=self.note,
                      curves={i: list(c) for i, c in self.curves.items()})  # fmt: skip
            self._write()
            for planned in self.planned:
                row = self.rows[planned.index]
                if row["status"] == "finished":
                    continue
                if self._stop.is_set():
                    row["status"] = "not run"
                    continue
                self._one(planned, row, snapshot)
                self._write()
            self.state = "stopped" if self._stop.is_set() and any(r["status"] == "stopped" or r["status"] == "not run"
                                                                   for r in self.rows) else "finished"  # fmt: skip
            if self.state == "finished":
                self._keep(snapshot)
            else:
                self.model = self.base
        except BaseException as exc:  # a bug of ours: the base goes back, the error is kept for wait()
            self.state, self.error = "failed", exc
            unwrap(self.base, snapshot)
            self.model = self.base
        finally:
            self._write()
            table = self.table
            self.emit("sweep_end", state=self.state, table=table, best=table.best, best_by=table.best_label,
                      kept=list(self.kept), not_kept=dict(self.not_kept))  # fmt: skip
            self.finished.set()

    def _one(self, planned: PlannedRun, row: dict, snapshot: BaseSnapshot) -> None:
        from ..train import make_train_config, start_prepared

        settings = dict(planned.settings)
        method = planned.method
        train = {k: v for k, v in {**self.shared_train, **settings}.items() if k in keys("train")}
        run_dir = self.sweep_dir / planned.name
        config = make_train_config(**{**train, "output_dir": str(run_dir / "checkpoints")})
        row["status"] = "running"
        self.emit("run_start", planned.index, planned.name, settings=_plain(settings), method=method)
        model = self.base
        ends: list = []
        try:
            model = wrap(self.base, method, {**_defaults(), **settings}, config.seed)
            row["trainable_params"], row["total_params"] = counts(model)
            import torch

            cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def forward(event, index=planned.index, name=planned.name):
                if event.kind == "end":
                    ends.append(event.data)
                self.emit("train", index, name, event=event)

            resume_from = self.resume.pop(planned.index, None)
            self.current = start_prepared(model, self.prepared, config, self.tokenizer, run_dir / "checkpoints",
                                          observers=[forward], background=True, trainer_args=self.trainer_args,
                                          resume_from=Path(resume_from) if resume_from else None)  # fmt: skip
            run = self.current
            if self._stop.is_set():
                run.stop(wait=False)
            run.finished.wait()
            if run.thread is not None:
                run.thread.join()
            self.current = None
            end = ends[-1] if ends else {}
            row["time_s"] = end.get("elapsed", run.elapsed())
            row["tokens_per_s"] = end.get("tokens_per_s")
            row["train_loss"] = run.history[-1]["loss"] if run.history else None
            self.curves[planned.index] = [
                [h["step"], h["loss"]] for h in run.history if h.get("loss") is not None
            ]
            if run.evals:
                row["eval_loss"] = run.evals[-1]["eval_loss"]
                row["accuracy"] = run.evals[-1].get("accuracy")
            if cuda:
                row["peak_memory"], row["memory_source"] = int(torch.cuda.max_memory_allocated()), "measured"
            else:
                row["peak_memory"], row["memory_source"] = _estimate(model, method, config)
            row["checkpoint"] = str(run.checkpoint) if run.checkpoint else None
            if run.state == "failed" or run.state == "oom":
                why = run.error if run.error is not None else (end.get("state") or run.state)
                row["status"] = f"failed: {_one_line(why)}"
            elif run.state == "stopped":
                row["status"] = "stopped"
            else:
                row["adapter_bytes"] = save_run(model, method, run_dir / "adapter", snapshot)
                row["adapter_dir"] = str(run_dir / "adapter")
                row["status"] = "finished"
        except Exception as exc:
            self.current = None
            row["status"] = f"failed: {_one_line(exc)}"
            row.setdefault("error", "".join(traceback.format_exception_only(type(exc), exc)).strip())
        finally:
            unwrap(model, snapshot)
        self.emit("run_end", planned.index, planned.name, row=dict(row))

    def _keep(self, snapshot: BaseSnapshot) -> None:
        finished = [r for r in self.rows if r["status"] == "finished"]
        if self.keep == "none" or not finished:
            self.model = self.base
            return
        chosen = [self.best] if self.keep == "best" else finished
        model = self.base
        for row in chosen:
            if row is None:
                continue
            method, directory = row["method"], Path(row["adapter_dir"])
            if method in ("full", "head"):
                if self.keep == "all":
                    self.not_kept[row["run"]] = "full/head runs change the base weights: only one can be kept"
                    continue
                load_weights(self.base, directory)
                self.kept.append(f"weights of {row['run']}")
            elif self.keep == "all" and method not in LORA_FAMILY:
                self.not_kept[row["run"]] = (f"a {method} adapter cannot share a model with LoRA adapters (PEFT "
                                             f"holds one adapter type per model); it is saved in {directory}")  # fmt: skip
            else:
                model = load_adapter(model, method, directory, _adapter_name(row["run"]))
                self.kept.append(_adapter_name(row["run"]))
        self.model = model

    def _write(self) -> None:
        """``sweep.json``: the plan, the shared settings and every row; written atomically after every run."""
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        doc = {"state": self.state, "keep": self.keep, "metric": self.metric, "varying": list(self.varying),
               "train_settings": _plain(self.shared_train), "note": self.note, "data": self.data_id,
               "curves": {str(i): c for i, c in self.curves.items()},
               "planned": [{"index": p.index, "name": p.name, "settings": _plain(p.settings)} for p in self.planned],
               "rows": [_plain(r) for r in self.rows]}  # fmt: skip
        tmp = self.sweep_dir / f".{SWEEP_FILE}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.sweep_dir / SWEEP_FILE)

    def start(self, background: bool) -> Sweep:
        _LAST[self.base] = self
        self.thread = threading.Thread(target=self.run, name="jupyter-lora-sweep", daemon=True)
        run_registry.register_sweep(self.base, self)
        self.thread.start()
        if not background:
            try:
                while not self.finished.wait(0.1):
                    pass
            except KeyboardInterrupt:
                self.stop(wait=True)
            if self.error is not None:
                raise self.error
        return self


def _adapter_name(run: str) -> str:
    """The adapter name a kept run gets: its run name in the letters an adapter name allows."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", run)


def _defaults() -> dict[str, Any]:
    return {k: SETTINGS[k].default for k in sweep_keys()}


def _estimate(model: nn.Module, method: str, config: Any) -> tuple[int | None, str]:
    # the estimate prices an adapter on a frozen base; full and head runs train base weights
    if method in ("full", "head"):
        return None, "no estimate for this method"
    try:
        from ..memory import estimate

        return int(
            estimate(model, seq=config.seq, batch=config.batch, optim=config.optim).total_bytes
        ), "estimate"
    except Exception:
        return None, "no estimate"


def _one_line(value: Any) -> str:
    text = str(value).strip().splitlines()
    first = text[0] if text else type(value).__name__
    if isinstance(value, BaseException) and not isinstance(value, UsageError):
        first = f"{type(value).__name__}: {first}"
    return first[:200]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _varying(planned: list[PlannedRun]) -> tuple[str, ...]:
    return varying_settings([p.settings for p in planned])


def _pending(p: PlannedRun, varying: tuple[str, ...]) -> dict:
    row = {"run": p.name, "method": p.method, **{k: p.settings.get(k) for k in varying if k != "method"}}
    # the varying settings this run's method does not use: the table shows "—" for them
    row["unused"] = [k for k in varying if k != "method" and not applies(p.method, k)]
    row.update(trainable_params=None, total_params=None, adapter_bytes=None, eval_loss=None, accuracy=None,
               train_loss=None, time_s=None, tokens_per_s=None, peak_memory=None, memory_source=None,
               status="pending")  # fmt: skip
    return row


def _check_keep(keep: Any) -> str:
    if keep not in KEEP:
        raise UsageError(
            f"`keep` must be one of {', '.join(KEEP)}, got {keep!r}.{did_you_mean(str(keep), KEEP)}"
        )
    return keep


def _check_metric(metric: Any) -> str:
    allowed = ("eval_loss", "accuracy", "train_loss", "time_s", "tokens_per_s")
    if metric not in allowed:
        raise UsageError(
            f"`metric` must be one of {', '.join(allowed)}, got {metric!r}.{did_you_mean(str(metric), allowed)}"
        )
    return metric


def _not_busy(base: nn.Module, action: str = "start a sweep") -> None:
    busy = run_registry.busy_message(base, action)
    if busy is not None:
        raise UsageError(busy)
    if run_registry.active_run(base) is not None:
        raise UsageError(f"Cannot {action} while this model is training. Stop that run first (run.stop() or "
                         "%lora stop model) — it saves a checkpoint.")  # fmt: skip


def _prepare(base, data, tokenizer, processor, eval_data, train_settings):
    from ..train import make_train_config, prepare_for, preprocessor_for, task_of

    config = make_train_config(**train_settings)
    tokenizer = preprocessor_for(base, task_of(base, config.task), tokenizer, processor)
    return prepare_for(base, config, data, tokenizer, eval_data), tokenizer


def sweep(
    model: nn.Module,
    data: Any,
    grid: dict | None = None,
    runs: list | None = None,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    eval_data: Any = None,
    keep: str = "best",
    metric: str | None = None,
    output_dir: str | os.PathLike | None = None,
    observers: Any = (),
    background: bool = True,
    trainer_args: dict | None = None,
    **train_settings: Any,
) -> Sweep:
    """Train one run per point of ``grid`` (``{setting: [values]}``, every combination) and per entry of ``runs``
    (``[{setting: value}, ...]``; with a grid, every run is combined with every grid point), one after another
    on the same prepared data, eval split and seed, each from the same base weights. Keys: any inject or training
    setting, ``method`` (lora | full | head | prompt_tuning | prefix_tuning | ia3 | loha | lokr),
    ``num_virtual_tokens`` and ``quant`` (4bit | none). ``train_settings`` (and inject settings) are shared by
    every run. ``keep``: best (the best run's adapter or weights), none (the base exactly as before) or all (every
    LoRA run as a named adapter). ``metric``: what "best" means (default: accuracy for classifiers, else
    eval_loss). The model must be a plain model (no adapter). Returns a ``Sweep`` at once (``background``);
    afterwards ``sweep.model`` is what the model variable should hold."""
    require_module(model)
    from ..adapters.peft_facts import wrapper_for

    _not_busy(base_model_of(model))  # before the adapter check: a sweep's own run holds one
    if wrapper_for(model) is not None:
        raise UsageError("A sweep starts from the base model, and this one holds an adapter. Unload it first "
                         "(model = jupyter_lora.unload(model)) or save it, then sweep.")  # fmt: skip
    base = base_model_of(model)
    keep = _check_keep(keep)
    given_train = {k: v for k, v in train_settings.items() if name_of(k) in keys("train")}
    shared_train = canonical(given_train, "train")
    others = {k: v for k, v in train_settings.items() if k not in given_train}
    planned, note = plan(grid, runs, others)
    if "output_dir" in shared_train:
        raise UsageError("`output_dir` of a sweep is sweep(..., output_dir=DIR): each run writes under it.")
    for p in planned:
        check_method(base, p.method, f"run {p.name}")
        if p.settings.get("quant") and p.method != "lora":
            raise UsageError(
                f"run {p.name}: `quant: 4bit` trains LoRA on a 4-bit base; use it with method lora."
            )
        if p.settings.get("quant"):
            raise UsageError(f"run {p.name}: `quant: 4bit` cannot vary within a sweep, whose runs all start from "
                             "the one base in memory; load a 4-bit base (%lora base VAR ID --4bit) and sweep that "
                             "model beside a sweep of the full-precision one.")  # fmt: skip
    from ..data.processors import CLASSIFY_TASKS
    from ..train import make_train_config, task_of

    for p in planned:  # every run's training settings checked before any run starts
        make_train_config(**{**shared_train, **{k: v for k, v in p.settings.items() if k in keys("train")}})
    config = make_train_config(**shared_train)
    metric = _check_metric(
        metric or ("accuracy" if task_of(base, config.task) in CLASSIFY_TASKS else "eval_loss")
    )
    prepared, tokenizer = _prepare(base, data, tokenizer, processor, eval_data, shared_train)
    data_id = _data_id(prepared, config.seed)
    sweep_dir = Path(output_dir) if output_dir else _default_dir()
    if (sweep_dir / SWEEP_FILE).exists():
        raise UsageError(f"`output_dir` {str(sweep_dir)!r} holds another sweep; continue it with resume_sweep(model, "
                         f"{str(sweep_dir)!r}, data=...) or give a new directory.")  # fmt: skip
    sweep_ = Sweep(base, planned, prepared, tokenizer, shared_train, sweep_dir, keep, metric,
                   _observer_list(observers), trainer_args, note=note, data_id=data_id)  # fmt: skip
    return sweep_.start(background)


def _default_dir() -> Path:
    from ..train.runlist import RUNS_DIR

    return RUNS_DIR / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def _observer_list(observers: Any) -> list:
    if observers is None:
        return []
    return [observers] if callable(observers) else list(observers)


def last_sweep(model: nn.Module) -> Sweep | None:
    """The most recent sweep of ``model`` in this session, or None."""
    return _LAST.get(base_model_of(model))


def resume_sweep(
    model: nn.Module,
    sweep_dir: str | os.PathLike | None = None,
    *,
    data: Any = None,
    tokenizer: Any = None,
    processor: Any = None,
    eval_data: Any = None,
    observers: Any = (),
    background: bool = True,
    trainer_args: dict | None = None,
) -> Sweep:
    """Continue a stopped sweep of ``model``: finished rows are kept, the stopped run continues from its
    checkpoint, the runs not started run. ``sweep_dir``: default the model's last sweep in this session. ``data``:
    needed for a sweep of another session (the same data, so that the split is the same)."""
    require_module(model)
    base = base_model_of(model)
    _not_busy(base, "resume a sweep")
    last = _LAST.get(base)
    if sweep_dir is None:
        if last is None:
            raise UsageError("No sweep of this model in this session; give its directory: resume_sweep(model, "
                             "'lora_runs/sweep-...', data=...).")  # fmt: skip
        sweep_dir = last.sweep_dir
    sweep_dir = Path(sweep_dir)
    try:
        doc = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"`sweep_dir` {str(sweep_dir)!r}: {SWEEP_FILE} cannot be read ({exc}).") from None
    try:
        planned, shared_train, rows, resume, curves = _read_doc(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        why = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else _one_line(exc)
        raise UsageError(f"{SWEEP_FILE} in {str(sweep_dir)!r} is damaged: {why}; start a new sweep "
                         "(jupyter_lora.sweep).") from None  # fmt: skip
    if data is None:
        if last is None or last.sweep_dir != sweep_dir:
            raise UsageError("`data` is needed to resume a sweep of another session: resume_sweep(model, DIR, "
                             "data=...).")  # fmt: skip
        prepared, tok = last.prepared, last.tokenizer
    else:
        prepared, tok = _prepare(base, data, tokenizer, processor, eval_data, shared_train)
    from ..train import make_train_config

    data_id = _data_id(prepared, make_train_config(**shared_train).seed)
    saved = doc.get("data")
    if saved is not None and saved != data_id:
        raise UsageError(f"The data differs from the sweep's in {str(sweep_dir)!r} (its prepared examples, eval "
                         f"split or seed: {_data_words(saved)} then, {_data_words(data_id)} now); pass the same data "
                         "(and eval_data) to resume it, or start a new sweep with this data.")  # fmt: skip
    sweep_ = Sweep(base, planned, prepared, tok, shared_train, sweep_dir, doc["keep"], doc["metric"],
                   _observer_list(observers), trainer_args if trainer_args is not None else
                   (last.trainer_args if last is not None else None), rows=rows, resume=resume,
                   note=doc.get("note") or "", data_id=data_id, curves=curves)  # fmt: skip
    return sweep_.start(background)


def _read_doc(doc: Any) -> tuple[list[PlannedRun], dict, list[dict], dict[int, str], dict[int, list]]:
    """The plan, shared settings, rows (finished ones kept, the rest pending), checkpoints to resume and loss
    curves of a ``sweep.json``; KeyError, TypeError or ValueError where it is not one this module wrote."""
    if not isinstance(doc, dict):
        raise TypeError(f"a {type(doc).__name__} instead of a mapping")
    _check_keep(doc["keep"])
    _check_metric(doc["metric"])
    if not isinstance(doc["train_settings"], dict) or not isinstance(doc["varying"], list):
        raise TypeError("train_settings or varying of the wrong type")
    planned = []
    for i, p in enumerate(doc["planned"]):
        if p["index"] != i or not isinstance(p["name"], str) or not isinstance(p["settings"], dict):
            raise ValueError(f"planned run {i} is not the plan's run {i}")
        planned.append(PlannedRun(i, p["name"], p["settings"]))
    if not planned or len(doc["rows"]) != len(planned):
        raise ValueError(f"{len(doc['rows'])} rows for {len(planned)} planned runs")
    varying = tuple(doc["varying"])
    rows, resume = [], {}
    for p, row in zip(planned, doc["rows"], strict=True):
        if not isinstance(row, dict) or not isinstance(row["status"], str) or row.get("run") != p.name:
            raise ValueError(f"the row of run {p.name} is not its row")
        if row["status"] == "finished":
            if not isinstance(row.get("adapter_dir"), str):
                raise ValueError(f"finished run {p.name} names no adapter directory")
            rows.append(row)
            continue
        if row["status"] == "stopped" and row.get("checkpoint"):
            resume[p.index] = str(row["checkpoint"])
        rows.append(_pending(p, varying))
    curves = {int(i): [[int(s), float(v)] for s, v in c] for i, c in (doc.get("curves") or {}).items()
              if int(i) < len(planned)}  # fmt: skip
    return planned, doc["train_settings"], rows, resume, curves


def _data_id(prepared: Any, seed: int) -> dict:
    """What a sweep's runs train and evaluate on: a hash of the tokenized train and eval examples and the seed,
    and their counts (resuming with other data would compare rows evaluated on different examples)."""
    import hashlib

    digest = hashlib.sha256(f"seed={seed};".encode())
    for split in (prepared.train, prepared.eval or []):
        digest.update(f"split:{len(split)};".encode())
        for example in split:
            _hash_value(digest, example)
    return {"hash": digest.hexdigest(), "train": len(prepared.train), "eval": len(prepared.eval or []),
            "seed": seed}  # fmt: skip


def _hash_value(digest: Any, value: Any) -> None:
    import array

    if isinstance(value, dict):
        digest.update(f"{{{len(value)}".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key}=".encode())
            _hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        try:  # token ids: their bytes at once
            digest.update(f"[{len(value)}i".encode() + array.array("q", value).tobytes())
        except (TypeError, OverflowError):
            digest.update(f"[{len(value)}".encode())
            for item in value:
                _hash_value(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, bytes):
        digest.update(b"b" + value)
    elif hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor or an array (images, audio)
        import numpy as np

        data = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        digest.update(f"a{data.shape}{data.dtype};".encode() + np.ascontiguousarray(data).tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "size"):  # a PIL image
        digest.update(f"img{value.size}{getattr(value, 'mode', '')};".encode() + value.tobytes())
    else:  # an object with no stable bytes: its type only
        digest.update(f"<{type(value).__qualname__}>".encode())


def _data_words(data_id: Any) -> str:
    if not isinstance(data_id, dict):
        return "unknown"
    return f"{data_id.get('train')} train / {data_id.get('eval')} eval examples, seed {data_id.get('seed')}"


def text_observer(write: Any = print) -> Any:
    """An observer that writes one line per finished run and the table at the end (for a terminal, or a notebook
    without widgets)."""

    def observe(event: SweepEvent) -> None:
        if event.kind == "sweep_start":
            write(f"Sweep of {len(event.data['planned'])} runs → {event.data['sweep_dir']}")
        elif event.kind == "run_end":
            row = event.data["row"]
            loss = "" if row.get("eval_loss") is None else f" · eval loss {row['eval_loss']:.4f}"
            acc = "" if row.get("accuracy") is None else f" · accuracy {row['accuracy']:.3f}"
            params = (
                "" if row.get("trainable_params") is None else f" · {row['trainable_params']:,} trainable"
            )
            took = "" if row.get("time_s") is None else f" · {row['time_s']:.1f}s"
            write(f"[{event.index + 1}] {event.name}: {row['status']}{params}{loss}{acc}{took}")
        elif event.kind == "sweep_end":
            table = event.data["table"]
            write(repr(table))
            if table.best is not None:
                write(f"★ {table.best['run']}: {table.best_label}.")
            kept = event.data.get("kept") or []
            write(f"Sweep {event.data['state']}; the model holds: {', '.join(kept) if kept else 'the base'}.")
            for run, why in (event.data.get("not_kept") or {}).items():
                write(f"  not kept: {run}: {why}")

    return observe
