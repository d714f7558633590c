"""Renderings of core results: HTML for notebooks and aligned plain text for terminals, both from the same data.

Every user-supplied string goes through ``html.escape``. Nothing here imports IPython, ipywidgets or plotly.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .core.adapters import AdapterStatus
    from .core.compare import Comparison
    from .core.memory import MemoryEstimate
    from .core.plan import Plan

__all__ = [
    "estimate_html",
    "estimate_text",
    "fmt_bytes",
    "fmt_count",
    "plan_html",
    "plan_text",
    "status_html",
    "status_text",
]

_COMPONENT_LABELS = {
    "weights": "base weights",
    "quant_constants": "quant. constants",
    "adapter": "adapter weights",
    "gradients": "adapter gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "logits": "logits",
    "kv_cache": "KV cache",
    "overhead": "workspace/overhead",
    "cuda_context": "CUDA context",
}


def fmt_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    """Bytes in binary units: '1.5 GiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return (
                f"{value:.0f} {unit}"
                if unit == "B"
                else f"{value:.3g} {unit}"
                if value < 100
                else f"{value:.0f} {unit}"
            )
        value /= 1024
    raise AssertionError


def _table_text(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [
        max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if right[i] else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    def cell(tag, value, i):
        align = "right" if right[i] else "left"
        return f"<{tag} style='text-align:{align};padding:1px 8px'>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table class='jl-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------ plan


def _plan_rows(p: Plan) -> list[list[str]]:
    rows = []
    for g in p.groups():
        if g.role == "lora":
            shape = f"{g.in_features}→{g.out_features}"
            rows.append([g.name, g.kind, str(g.count), shape, fmt_count(g.params)])
        else:
            rows.append([g.name, "trained fully", str(g.count), g.kind, fmt_count(g.params)])
    return rows


def _plan_headline(p: Plan) -> str:
    spec = p.spec
    variant = "" if spec.variant == "lora" else f" {spec.variant}"
    n = sum(1 for r in p.modules if r.role == "lora")
    return (
        f"LoRA{variant} '{p.name}': r={spec.r}, alpha={spec.lora_alpha:g}, dropout={spec.dropout:g} on {n} "
        f"modules — trainable {p.trainable_params:,} of {p.total_params:,} ({100 * p.trainable_fraction:.3g}%), "
        f"adapter {fmt_bytes(p.adapter_bytes)} on disk"
    )


_PLAN_HEADERS = ("module", "kind", "count", "shape", "params")
_PLAN_RIGHT = (False, False, True, False, True)


def plan_text(p: Plan) -> str:
    lines = [_plan_headline(p)]
    if p.replaces:
        lines.append(f"(replaces the existing adapter '{p.name}')")
    lines += _table_text(_PLAN_HEADERS, _plan_rows(p), _PLAN_RIGHT)
    return "\n".join(lines)


def plan_html(p: Plan) -> str:
    extra = f"<div><i>replaces the existing adapter '{html.escape(p.name)}'</i></div>" if p.replaces else ""
    return (
        f"<div class='jl-plan'><div><b>{html.escape(_plan_headline(p))}</b></div>{extra}"
        f"{_table_html(_PLAN_HEADERS, _plan_rows(p), _PLAN_RIGHT)}</div>"
    )


# ------------------------------------------------------------------------------------------------ estimate


def _estimate_headline(m: MemoryEstimate) -> str:
    setup = (
        f"batch {m.batch} × seq {m.seq}, {m.dtype}{' ' + m.quant if m.quant else ''}, {m.optim}"
        f"{', gradient checkpointing' if m.ckpt else ''}"
    )
    text = f"Training ≈ {fmt_bytes(m.total_bytes)} ({setup}); inference ≈ {fmt_bytes(m.inference_bytes)}"
    if m.gpu_capacity_bytes is not None:
        verdict = "fits" if m.fits else "does NOT fit"
        text += f" — {verdict} on {m.gpu_name} ({fmt_bytes(m.gpu_capacity_bytes)})"
    return text


def _estimate_rows(m: MemoryEstimate) -> list[list[str]]:
    total = m.total_bytes or 1
    rows = []
    for key, value in m.breakdown.items():
        if value:
            rows.append(
                [
                    _COMPONENT_LABELS.get(key, key),
                    fmt_bytes(value),
                    f"{100 * value / total:.0f}%",
                    fmt_bytes(m.inference.get(key, 0)) if key in m.inference else "",
                ]
            )
    for key, value in m.inference.items():
        if key not in m.breakdown and value:
            rows.append([_COMPONENT_LABELS.get(key, key), "", "", fmt_bytes(value)])
    rows.append(["total", fmt_bytes(m.total_bytes), "100%", fmt_bytes(m.inference_bytes)])
    return rows


_EST_HEADERS = ("component", "training", "share", "inference")
_EST_RIGHT = (False, True, True, True)


def estimate_text(m: MemoryEstimate) -> str:
    lines = [_estimate_headline(m), *_table_text(_EST_HEADERS, _estimate_rows(m), _EST_RIGHT)]
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)


def estimate_html(m: MemoryEstimate) -> str:
    notes = "".join(f"<div><i>{html.escape(n)}</i></div>" for n in m.notes)
    bar = ""
    if m.gpu_capacity_bytes:
        used = min(100.0, 100 * m.total_bytes / m.gpu_capacity_bytes)
        color = "#2e7d32" if m.fits else "#c62828"
        bar = (
            f"<div style='width:320px;height:10px;background:#eee;border-radius:3px'>"
            f"<div style='width:{used:.1f}%;height:10px;background:{color};border-radius:3px'></div></div>"
        )
    return (
        f"<div class='jl-estimate'><div><b>{html.escape(_estimate_headline(m))}</b></div>{bar}"
        f"{_table_html(_EST_HEADERS, _estimate_rows(m), _EST_RIGHT)}{notes}</div>"
    )


# ------------------------------------------------------------------------------------------------ status


_STATUS_HEADERS = ("adapter", "active", "variant", "r", "alpha", "modules", "params")
_STATUS_RIGHT = (False, False, False, True, True, True, True)


def _status_rows(s: AdapterStatus) -> list[list[str]]:
    return [
        [
            a.name,
            "yes" if a.active else "",
            a.variant,
            str(a.r),
            f"{a.alpha:g}",
            str(a.modules),
            fmt_count(a.params),
        ]
        for a in s.adapters
    ]


def _status_headline(s: AdapterStatus) -> str:
    if not s.adapters:
        return f"No LoRA adapter on this {s.model_type or 'model'} ({s.total_params:,} parameters)."
    state = "enabled" if s.enabled else "disabled" if s.enabled is False else "partly enabled"
    merged = f", merged: {', '.join(s.merged)}" if s.merged else ""
    return (
        f"{len(s.adapters)} adapter(s) on {s.model_type or 'model'}, {state}{merged} — trainable "
        f"{s.trainable_params:,} of {s.total_params:,}"
    )


def status_text(s: AdapterStatus) -> str:
    lines = [_status_headline(s)]
    if s.adapters:
        lines += _table_text(_STATUS_HEADERS, _status_rows(s), _STATUS_RIGHT)
    return "\n".join(lines)


def status_html(s: AdapterStatus) -> str:
    table = _table_html(_STATUS_HEADERS, _status_rows(s), _STATUS_RIGHT) if s.adapters else ""
    return f"<div class='jl-status'><div><b>{html.escape(_status_headline(s))}</b></div>{table}</div>"


# ------------------------------------------------------------------------------------------------ compare


def comparison_text(c: Comparison) -> str:
    lines = [f"prompt: {c.prompt}"]
    if c.kind == "classification":
        rows = [
            [label, f"{b:.3f}", f"{a:.3f}"]
            for label, b, a in zip(c.labels, c.base_probs, c.adapter_probs, strict=True)
        ]
        lines += _table_text(("label", "base", f"adapter '{c.adapter_name}'"), rows, (False, True, True))
        return "\n".join(lines)
    lines += [f"base:               {c.base}", f"adapter '{c.adapter_name}': {c.adapter}"]
    return "\n".join(lines)


def comparison_html(c: Comparison) -> str:
    prompt = f"<div><b>prompt</b>: {html.escape(c.prompt)}</div>"
    if c.kind == "classification":
        rows = [
            [label, f"{b:.3f}", f"{a:.3f}"]
            for label, b, a in zip(c.labels, c.base_probs, c.adapter_probs, strict=True)
        ]
        table = _table_html(("label", "base", f"adapter '{c.adapter_name}'"), rows, (False, True, True))
        return f"<div class='jl-compare'>{prompt}{table}</div>"
    cell = "style='vertical-align:top;padding:4px 8px;border:1px solid #ddd;white-space:pre-wrap;max-width:480px'"
    return (
        f"<div class='jl-compare'>{prompt}<table><tr><th>base</th><th>adapter '{html.escape(c.adapter_name)}'</th></tr>"
        f"<tr><td {cell}>{html.escape(c.base)}</td><td {cell}>{html.escape(c.adapter)}</td></tr></table></div>"
    )


# ------------------------------------------------------------------------------------------------ inject summary


@dataclass(frozen=True)
class InjectSummary:
    """What a ``%%lora`` cell did (or, with --dry-run, would do): the plan and the memory estimate."""

    plan: Plan
    estimate: MemoryEstimate | None
    variable: str
    dry_run: bool = False

    def _repr_html_(self) -> str:
        return summary_html(self)

    def __repr__(self) -> str:
        return summary_text(self)


_MEMORY_KEYS = ("weights", "adapter", "gradients", "optimizer", "activations")


def _memory_line(m: MemoryEstimate) -> list[list[str]]:
    rows = [
        [
            _COMPONENT_LABELS[k],
            fmt_bytes(m.breakdown[k] + (m.breakdown["quant_constants"] if k == "weights" else 0)),
        ]
        for k in _MEMORY_KEYS
    ]
    other = m.total_bytes - sum(m.breakdown[k] for k in _MEMORY_KEYS) - m.breakdown["quant_constants"]
    rows.append(["logits + overhead", fmt_bytes(other)])
    total = fmt_bytes(m.total_bytes)
    if m.gpu_capacity_bytes is not None:
        total += f" of {fmt_bytes(m.gpu_capacity_bytes)} ({m.gpu_name})"
    rows.append(["total", total])
    return rows


def _summary_title(s: InjectSummary) -> str:
    if s.dry_run:
        return f"dry run — `{s.variable}` is unchanged"
    return f"`{s.variable}` now holds the adapted model"


def summary_text(s: InjectSummary) -> str:
    lines = [_summary_title(s), plan_text(s.plan)]
    if s.estimate is not None:
        m = s.estimate
        lines.append(f"GPU memory to train (batch {m.batch} × seq {m.seq}, {m.dtype}, {m.optim}):")
        lines += _table_text(("component", "bytes"), _memory_line(m), (False, True))
    return "\n".join(lines)


def summary_html(s: InjectSummary) -> str:
    parts = [f"<div><i>{html.escape(_summary_title(s))}</i></div>", plan_html(s.plan)]
    if s.estimate is not None:
        m = s.estimate
        parts.append(
            f"<div style='margin-top:6px'><b>GPU memory to train</b> (batch {m.batch} × seq {m.seq}, "
            f"{html.escape(m.dtype)}, {html.escape(m.optim)})</div>"
        )
        parts.append(_table_html(("component", "bytes"), _memory_line(m), (False, True)))
    return "<div class='jl-summary'>" + "".join(parts) + "</div>"
