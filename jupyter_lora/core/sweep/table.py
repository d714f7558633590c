"""``SweepTable``: one row per planned run, as data (``rows``), pandas (``to_pandas``), HTML and text."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from ..units import fmt_bytes

__all__ = ["COLUMNS", "SweepTable"]

# row keys, in display order (the settings that vary come after `method`)
COLUMNS = ("run", "method", "trainable_params", "total_params", "adapter_bytes", "eval_loss", "accuracy",
           "train_loss", "time_s", "tokens_per_s", "peak_memory", "memory_source", "status")  # fmt: skip


NOT_USED = "—"  # the cell of a setting the run's method does not use (the row's ``unused``)
_LABELS = {"eval_loss": "eval loss", "accuracy": "accuracy", "train_loss": "training loss",
           "time_s": "training time", "tokens_per_s": "tokens/s"}  # fmt: skip


def _better(metric: str) -> int:
    """-1 when lower is better (losses), +1 otherwise."""
    return -1 if "loss" in metric else 1


class SweepTable:
    """The result of a sweep. ``rows``: dicts with ``COLUMNS`` and the varying settings (``varying``); ``best``:
    the finished row with the best ``metric`` (lower is better for a loss, higher otherwise; without any eval loss,
    the training loss judges, and ``best_label`` says so). ``note``: the settings a method does not use, dropped
    from its runs."""

    def __init__(self, rows: Sequence[dict], varying: Sequence[str] = (), metric: str = "eval_loss",
                 note: str = ""):  # fmt: skip
        self.rows = [dict(r) for r in rows]
        self.varying = tuple(v for v in varying if v != "method")
        self.metric = metric
        self.note = note

    def best_by(self, metric: str | None = None) -> dict | None:
        metric = metric or self.metric
        scored = [r for r in self.rows if r.get("status") == "finished" and _number(r.get(metric))]
        if not scored and metric == "eval_loss":  # no evaluation data: the last training loss judges
            return self.best_by("train_loss")
        if not scored:
            return None
        sign = _better(metric)
        return max(scored, key=lambda r: sign * r[metric])

    @property
    def best_metric(self) -> str:
        """The metric "best" is judged by: ``metric``, or the training loss when no finished run has an eval
        loss (there was no eval split)."""
        done = [r for r in self.rows if r.get("status") == "finished"]
        if self.metric == "eval_loss" and done and not any(_number(r.get("eval_loss")) for r in done):
            return "train_loss"
        return self.metric

    @property
    def best_label(self) -> str:
        """``best by eval loss``, or ``best by training loss (no eval split)``."""
        metric = self.best_metric
        text = f"best by {_LABELS.get(metric, metric)}"
        return text + " (no eval split)" if metric != self.metric else text

    @property
    def best(self) -> dict | None:
        """The best finished row by ``metric`` (None when no run finished with it)."""
        return self.best_by()

    def columns(self) -> list[str]:
        return ["run", "method", *self.varying, *COLUMNS[2:]]

    def to_pandas(self) -> Any:
        """A pandas DataFrame of the rows (the plain rows when pandas is not installed)."""
        try:
            import pandas as pd
        except ImportError:
            return self.rows
        return pd.DataFrame([{c: r.get(c) for c in self.columns()} for r in self.rows]).set_index("run")

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["run", "method", *self.varying, "trainable", "size", "eval loss", "accuracy", "time",
                   "tokens/s", "peak memory", "status"]  # fmt: skip
        best = self.best
        body = []
        for r in self.rows:
            memory = (
                ""
                if r.get("peak_memory") is None
                else f"{fmt_bytes(r['peak_memory'])} ({r['memory_source']})"
            )
            body.append([
                ("★ " if best is not None and r is best else "") + str(r["run"]), str(r["method"]),
                *(cell(r, k) for k in self.varying),
                "" if r.get("trainable_params") is None else f"{r['trainable_params']:,}",
                "" if r.get("adapter_bytes") is None else fmt_bytes(r["adapter_bytes"]),
                _num(r.get("eval_loss")), _num(r.get("accuracy")),
                "" if r.get("time_s") is None else f"{r['time_s']:.1f}s",
                "" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}", memory, str(r.get("status")),
            ])  # fmt: skip
        return headers, body

    def __repr__(self) -> str:
        headers, body = self._cells()
        widths = [
            max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)
        ]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
        lines += [f"★ {self.best_label}"] if self.best is not None else []
        lines += [f"note: {self.note}"] if self.note else []
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        headers, body = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        words = f"{self.best_label} ★" + (f" · {self.note}" if self.note else "")
        note = f"<caption>{html.escape(words)}</caption>"
        return f"<table class='jl-sweep'>{note}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> str:
    return f"{value:.4f}" if _number(value) else ""


def cell(row: dict, key: str) -> str:
    """What the table shows for setting ``key`` of ``row``: its value, or "—" where the run's method does not
    use it."""
    return NOT_USED if key in (row.get("unused") or ()) else _show(row.get(key))


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)
