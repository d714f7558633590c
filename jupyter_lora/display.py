"""Renderings of core results: HTML for notebooks and aligned plain text for terminals, both from the same data.

The core's result classes carry only a short ``__repr__``; ``register_formatters`` teaches an IPython shell to show
them with the renderings below (``jupyter_lora`` does that when it is imported in IPython, and ``%load_ext``).
Every user-supplied string goes through ``html.escape``. Nothing here imports IPython, ipywidgets or plotly.
"""

from __future__ import annotations

import html
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .core.units import fmt_bytes, fmt_count

if TYPE_CHECKING:  # pragma: no cover
    from .core.adapters import AdapterStatus
    from .core.compare import Comparison
    from .core.export import ExportResult
    from .core.memory import MemoryEstimate
    from .core.plan import Plan
    from .core.serve import Generations
    from .core.train.runlist import CheckpointRow, RunList

__all__ = [
    "RENDERINGS",
    "InjectSummary",
    "adapter_size",
    "comparison_html",
    "comparison_text",
    "estimate_html",
    "estimate_text",
    "export_html",
    "export_text",
    "fmt_bytes",
    "fmt_count",
    "generations_html",
    "generations_text",
    "load_code",
    "memory_parts",
    "plan_html",
    "plan_text",
    "register_formatters",
    "render_html",
    "render_text",
    "resume_code",
    "runs_html",
    "runs_text",
    "status_html",
    "status_text",
    "summary_html",
    "summary_text",
    "unregister_formatters",
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


def adapter_size(p: Plan) -> str:
    """The adapter's size as every summary shows it (the ``%%lora`` summary, the plan, the panel): the size of the
    ``adapter_model.safetensors`` that saving it writes — its tensors in the dtype they are saved in, plus the file's
    header (``Plan.adapter_bytes``, equal to the file's size byte for byte)."""
    return fmt_bytes(p.adapter_bytes)


def expert_shape(shape: Sequence[int]) -> str:
    """A fused expert weight's shape per expert: ``4 experts × 128×32``."""
    return f"{shape[0]} experts × {'×'.join(str(d) for d in shape[1:])}"


def _plan_rows(p: Plan) -> list[list[str]]:
    rows = []
    for g in p.groups():
        if g.role == "lora":
            shape = expert_shape(g.shape) if g.experts else f"{g.in_features}→{g.out_features}"
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
        f"adapter {adapter_size(p)} on disk"
    )


def _plan_notes(p: Plan) -> list[str]:
    notes = []
    if p.replaces:
        notes.append(f"replaces the existing adapter '{p.name}'")
    if p.removes_others:
        notes.append(f"removes the other adapters: {', '.join(repr(n) for n in p.other_adapters)}")
    if p.experts_note:
        notes.append(p.experts_note)
    return notes


_PLAN_HEADERS = ("module", "kind", "count", "shape", "params")
_PLAN_RIGHT = (False, False, True, False, True)


def plan_text(p: Plan) -> str:
    """A plan as a headline and an aligned table of the targeted modules."""
    lines = [_plan_headline(p), *(f"({note})" for note in _plan_notes(p))]
    lines += _table_text(_PLAN_HEADERS, _plan_rows(p), _PLAN_RIGHT)
    return "\n".join(lines)


def plan_html(p: Plan) -> str:
    """A plan as HTML: the headline and a table of the targeted modules."""
    extra = "".join(f"<div><i>{html.escape(note)}</i></div>" for note in _plan_notes(p))
    return (
        f"<div class='jl-plan'><div><b>{html.escape(_plan_headline(p))}</b></div>{extra}"
        f"{_table_html(_PLAN_HEADERS, _plan_rows(p), _PLAN_RIGHT)}</div>"
    )


# ------------------------------------------------------------------------------------------------ estimate


def _setup(m: MemoryEstimate) -> str:
    """The run an estimate describes: ``batch 8 × seq 512, bf16 nf4, adamw, gradient checkpointing on``."""
    return (
        f"{m.shape}, {m.dtype}{' ' + m.quant if m.quant else ''}, {m.optim}, "
        f"gradient checkpointing {'on' if m.ckpt else 'off'}"
    )


def _estimate_headline(m: MemoryEstimate) -> str:
    setup = _setup(m)
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
    """A memory estimate as a headline and an aligned table of its components."""
    lines = [_estimate_headline(m), *_table_text(_EST_HEADERS, _estimate_rows(m), _EST_RIGHT)]
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)


def estimate_html(m: MemoryEstimate) -> str:
    """A memory estimate as HTML, with a bar of the GPU's capacity when there is a GPU."""
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
            ("—" if a.r is None else str(a.r)) + _patterns(a.rank_pattern),
            ("—" if a.alpha is None else f"{a.alpha:g}") + _patterns(a.alpha_pattern),
            str(a.modules) + (f" (layers {', '.join(map(str, a.layers))})" if a.layers is not None else ""),
            fmt_count(a.params),
        ]
        for a in s.adapters
    ]


def _patterns(pattern: dict) -> str:
    """Per-module ranks or alphas of an adapter, after its default: `8 (q_proj: 16, +2)`."""
    if not pattern:
        return ""
    shown = [f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in list(pattern.items())[:2]]
    more = f", +{len(pattern) - 2}" if len(pattern) > 2 else ""
    return f" ({', '.join(shown)}{more})"


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
    """The adapters on a model as a headline and an aligned table."""
    lines = [_status_headline(s)]
    if s.adapters:
        lines += _table_text(_STATUS_HEADERS, _status_rows(s), _STATUS_RIGHT)
    return "\n".join(lines)


def status_html(s: AdapterStatus) -> str:
    """The adapters on a model as HTML."""
    table = _table_html(_STATUS_HEADERS, _status_rows(s), _STATUS_RIGHT) if s.adapters else ""
    return f"<div class='jl-status'><div><b>{html.escape(_status_headline(s))}</b></div>{table}</div>"


# ------------------------------------------------------------------------------------------------ compare


def comparison_text(c: Comparison) -> str:
    """Base and adapter outputs for one prompt, as text (the prompt as typed)."""
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
    """Base and adapter outputs side by side, as HTML."""
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


# ------------------------------------------------------------------------------------------------ generate


def _adapter_header(name: str) -> str:
    return "base" if name == "base" else f"adapter '{name}'"


def _generations_headline(g: Generations) -> str:
    rate = f", {g.new_tokens / g.seconds:,.0f} tokens/s" if g.seconds > 0 else ""
    return (
        f"{len(g.prompts)} prompt(s) × {len(g.adapters)} adapter(s) in one batch: {g.new_tokens} new tokens in "
        f"{g.seconds:.2f} s{rate}"
    )


def generations_text(g: Generations) -> str:
    """Prompts as rows, adapters as columns, as aligned text (line breaks in a reply shown as ⏎)."""
    rows = [[p, *(g.text(i, a).replace("\n", "⏎") for a in g.adapters)] for i, p in enumerate(g.prompts)]
    headers = ("prompt", *(_adapter_header(a) for a in g.adapters))
    return "\n".join([_generations_headline(g), *_table_text(headers, rows, [False] * len(headers))])


def generations_html(g: Generations) -> str:
    """Prompts as rows, adapters as columns, side by side, as HTML."""
    cell = "style='vertical-align:top;padding:4px 8px;border:1px solid #ddd;white-space:pre-wrap;max-width:420px'"
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in ("prompt", *(_adapter_header(a) for a in g.adapters))
    )
    body = "".join(
        f"<tr><td {cell}><b>{html.escape(p)}</b></td>"
        + "".join(f"<td {cell}>{html.escape(g.text(i, a))}</td>" for a in g.adapters)
        + "</tr>"
        for i, p in enumerate(g.prompts)
    )
    return (
        f"<div class='jl-generations'><div>{html.escape(_generations_headline(g))}</div>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
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


# The parts of a training estimate as the summaries show them (the %%lora summary's table, the panel's bar and
# legend): (key, label, the breakdown's components it adds up). Every component is in exactly one part.
_MEMORY_PARTS = (
    ("weights", "base weights", ("weights", "quant_constants")),
    ("adapter", "adapter weights", ("adapter",)),
    ("gradients", "adapter gradients", ("gradients",)),
    ("optimizer", "optimizer states", ("optimizer",)),
    ("activations", "activations", ("activations",)),
    ("logits", "logits", ("logits",)),
    ("other", "workspace/overhead", ("overhead", "cuda_context")),
)


def memory_parts(m: MemoryEstimate) -> list[tuple[str, str, int]]:
    """``(key, label, bytes)`` of the training memory by part, as both the ``%%lora`` summary and the panel show
    it; the parts add up to ``m.total_bytes``. "adapter weights" is the adapter in GPU memory (fp32 LoRA weights,
    no file header), not its size on disk (``adapter_size``)."""
    parts = [
        (key, label, sum(m.breakdown.get(c, 0) for c in components))
        for key, label, components in _MEMORY_PARTS
    ]
    rest = m.total_bytes - sum(b for _, _, b in parts)  # a component this table does not know yet
    if rest:
        key, label, value = parts[-1]
        parts[-1] = (key, label, value + rest)
    return parts


def _memory_line(m: MemoryEstimate) -> list[list[str]]:
    rows = [[label, fmt_bytes(value)] for _, label, value in memory_parts(m)]
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
    """What a ``%%lora`` cell did, as text: the plan and the memory to train."""
    lines = [_summary_title(s), plan_text(s.plan)]
    if s.estimate is not None:
        m = s.estimate
        lines.append(f"GPU memory to train with the training defaults ({_setup(m)}):")
        lines += _table_text(("component", "bytes"), _memory_line(m), (False, True))
    return "\n".join(lines)


def summary_html(s: InjectSummary) -> str:
    """What a ``%%lora`` cell did, as HTML."""
    parts = [f"<div><i>{html.escape(_summary_title(s))}</i></div>", plan_html(s.plan)]
    if s.estimate is not None:
        m = s.estimate
        parts.append(
            f"<div style='margin-top:6px'><b>GPU memory to train</b> with the training defaults "
            f"({html.escape(_setup(m))})</div>"
        )
        parts.append(_table_html(("component", "bytes"), _memory_line(m), (False, True)))
    return "<div class='jl-summary'>" + "".join(parts) + "</div>"


# ------------------------------------------------------------------------------------------------ export


def export_text(e: ExportResult) -> str:
    """Where a training job was exported and the commands that run it."""
    lines = [f"Exported the training job to {e.directory} ({', '.join(e.files)}). Run it with:"]
    lines += [f"  {c}" for c in e.commands]
    return "\n".join(lines)


def export_html(e: ExportResult) -> str:
    """Where a training job was exported and the commands that run it, as HTML."""
    commands = "".join(f"<pre style='margin:2px 0'>{html.escape(c)}</pre>" for c in e.commands)
    return (
        f"<div class='jl-export'>Exported the training job to <code>{html.escape(str(e.directory))}</code> "
        f"({html.escape(', '.join(e.files))}). Run it with:{commands}</div>"
    )


# ------------------------------------------------------------------------------------------------ runs

_RUNS_HEADERS = ("run", "checkpoint", "step", "train loss", "eval loss", "written", "size", "note")
_RUNS_RIGHT = (False, False, True, True, True, False, True, False)


def _loss(x: float | None) -> str:
    return "" if x is None else f"{x:#.4g}"


def _written(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _runs_cells(row: CheckpointRow) -> list[str]:
    return [
        str(row.run),
        row.checkpoint.name if row.checkpoint is not None else "",
        "" if row.step is None else str(row.step),
        _loss(row.train_loss),
        _loss(row.eval_loss),
        _written(row.written),
        "" if row.size is None else fmt_bytes(row.size),
        row.problem or ("best" if row.best else ""),
    ]


def resume_code(row: CheckpointRow, variable: str = "model") -> str:
    """The magic that continues training ``variable`` from the checkpoint of ``row``."""
    return f"%lora resume {variable} {shlex.quote(str(row.checkpoint))}"


def load_code(row: CheckpointRow, variable: str = "model") -> str:
    """The magic that loads the adapter of ``row``'s checkpoint into ``variable``."""
    name = f" --name {shlex.quote(row.adapter_name)}" if row.adapter_name else ""
    return f"%lora load {variable} {shlex.quote(str(row.adapter))}{name}"


def _runs_headline(r: RunList) -> str:
    where = ", ".join(str(p) for p in r.searched)
    if not r.rows:
        return f"No runs in {where}."
    return f"{len(r.run_dirs)} run(s), {len(r.checkpoints)} checkpoint(s) in {where}"


def runs_text(r: RunList) -> str:
    """The runs and checkpoints as an aligned table, then how to resume or load one."""
    lines = [_runs_headline(r)]
    if r.rows:
        lines += _table_text(_RUNS_HEADERS, [_runs_cells(row) for row in r.rows], _RUNS_RIGHT)
    row = r.latest
    if row is not None:
        lines.append(
            f"resume: {resume_code(row, r.variable)}    load the adapter: {load_code(row, r.variable)}"
        )
    return "\n".join(lines)


def runs_html(r: RunList) -> str:
    """The runs and checkpoints as an HTML table; each usable checkpoint with the resume and load magics as code
    (one click selects it for copying). A run from another session needs its data: `%%lora resume` with a
    `data:` body."""
    if not r.rows:
        return f"<div class='jl-runs'>{html.escape(_runs_headline(r))}</div>"
    headers = (*_RUNS_HEADERS, "resume from", "load adapter")
    right = (*_RUNS_RIGHT, False, False)
    code = "<code style='user-select:all;white-space:nowrap'>{}</code>"
    body = []
    for row in r.rows:
        cells = _runs_cells(row)
        if row.usable:
            cells += [code.format(html.escape(resume_code(row, r.variable))),
                      code.format(html.escape(load_code(row, r.variable)))]  # fmt: skip
        else:
            cells += ["", ""]
        tds = []
        for i, value in enumerate(cells):
            text = value if i >= len(_RUNS_HEADERS) else html.escape(value)
            style = f"text-align:{'right' if right[i] else 'left'};padding:1px 8px"
            if i == len(_RUNS_HEADERS) - 1 and row.problem:
                text = f"<span class='jl-problem' style='color:#c62828'>{text}</span>"
            tds.append(f"<td style='{style}'>{text}</td>")
        body.append(f"<tr data-run='{html.escape(str(row.run))}'>{''.join(tds)}</tr>")
    head = "".join(
        f"<th style='text-align:{'right' if right[i] else 'left'};padding:1px 8px'>{html.escape(h)}</th>"
        for i, h in enumerate(headers)
    )
    note = (
        "<div style='color:#666'>In a new session, give the data to resume: <code>%%lora resume MODEL PATH</code>"
        " with <code>data: VAR</code> in the body.</div>"
    )
    return (
        f"<div class='jl-runs'><div><b>{html.escape(_runs_headline(r))}</b></div>"
        f"<table class='jl-table'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</div>"
    )


# ------------------------------------------------------------------------------------------------ IPython formatters

# (module, class name) of each core result -> (plain-text rendering, HTML rendering)
RENDERINGS: dict[tuple[str, str], tuple[Callable[[Any], str], Callable[[Any], str]]] = {
    ("jupyter_lora.core.plan", "Plan"): (plan_text, plan_html),
    ("jupyter_lora.core.memory", "MemoryEstimate"): (estimate_text, estimate_html),
    ("jupyter_lora.core.adapters.inspection", "AdapterStatus"): (status_text, status_html),
    ("jupyter_lora.core.compare", "Comparison"): (comparison_text, comparison_html),
    ("jupyter_lora.core.serve", "Generations"): (generations_text, generations_html),
    ("jupyter_lora.core.export", "ExportResult"): (export_text, export_html),
    ("jupyter_lora.core.train.runlist", "RunList"): (runs_text, runs_html),
}


def _renderings(obj: Any) -> tuple[Callable[[Any], str], Callable[[Any], str]]:
    cls = type(obj)
    found = RENDERINGS.get((cls.__module__, cls.__name__))
    if found is None:
        raise TypeError(f"No rendering for {cls.__module__}.{cls.__name__}.")
    return found


def render_text(obj: Any) -> str:
    """The plain-text rendering of a core result (what a terminal IPython shows)."""
    return _renderings(obj)[0](obj)


def render_html(obj: Any) -> str:
    """The HTML rendering of a core result (what a notebook shows)."""
    return _renderings(obj)[1](obj)


def _pretty_printer(text: Callable[[Any], str]) -> Callable[[Any, Any, bool], None]:
    def printer(obj: Any, p: Any, cycle: bool) -> None:
        p.text(text(obj))

    return printer


# IPython's plain-text formatter calls printers as printer(obj, pretty_printer, cycle).
_PLAIN_PRINTERS = {key: _pretty_printer(text) for key, (text, _) in RENDERINGS.items()}


def _formatter_pairs(shell: Any):
    formatters = shell.display_formatter.formatters
    for key, (_, html_rendering) in RENDERINGS.items():
        yield formatters["text/plain"], key, _PLAIN_PRINTERS[key]
        yield formatters["text/html"], key, html_rendering


def register_formatters(shell: Any) -> bool:
    """Let ``shell`` (an IPython shell) show core results as aligned text and HTML. Classes are named, not
    imported, so nothing heavy loads. Returns whether anything was added (False when already registered)."""
    added = False
    for formatter, (module, name), func in _formatter_pairs(shell):
        if formatter.for_type_by_name(module, name) is not func:
            formatter.for_type_by_name(module, name, func)
            added = True
    return added


def unregister_formatters(shell: Any) -> None:
    """Remove what ``register_formatters`` added to ``shell``."""
    for formatter, (module, name), func in _formatter_pairs(shell):
        if formatter.for_type_by_name(module, name) is func:
            formatter.pop(f"{module}.{name}", None)
