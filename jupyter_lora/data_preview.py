"""The data preview's renderings: ``preview_data`` (the public function) runs the core's ``report_data`` — the
preparation training runs — and returns a ``DataPreview``, shown as HTML in a notebook and as aligned text in a
terminal, both from the same report.

HTML: masked tokens (label -100: the loss skips them) in grey, the cut at ``seq`` marked, a plotly histogram of the
token lengths (plotly.js is written into the first preview a process shows — no network — and later ones draw
with it; a text histogram is in the HTML too, shown wherever no script runs). Every user string goes through
``html.escape``.
"""

from __future__ import annotations

import bisect
import html
import math
import statistics
import sys
import uuid
from dataclasses import fields
from typing import Any

from .core.data.preview import DataReport, RecordView, report_data

__all__ = ["DataPreview", "histogram_bins", "preview_data", "preview_html", "preview_text"]

_MASKED_STYLE = "color:#9e9e9e;background:#f3f3f3"
_CUT_STYLE = "color:#c62828;font-weight:bold"
_BAR = "█"
_MASK_OPEN, _MASK_CLOSE = "⟦", "⟧"  # masked text in the text rendering
_HIST_MAX_WIDTH = "560px"  # the histogram is as wide as its output, up to this (narrower in a narrow one)


class DataPreview(DataReport):
    """What training would make of a data set (``DataReport``'s fields), shown as HTML and as text."""

    @classmethod
    def of(cls, report: DataReport) -> DataPreview:
        return cls(**{f.name: getattr(report, f.name) for f in fields(report)})

    def _repr_html_(self) -> str:
        return preview_html(self)

    def __repr__(self) -> str:
        return preview_text(self)


def preview_data(
    model: Any,
    data: Any,
    tokenizer: Any = None,
    *,
    eval_data: Any = None,
    n: int = 3,
    processor: Any = None,
    **settings: Any,
) -> DataPreview:
    """Show what ``train(model, data, ...)`` with these settings would train on, before a run starts: the first
    ``n`` records as the model sees them (chat template applied; masked tokens — label -100 — greyed; the cut at
    ``seq`` marked), a histogram of the token lengths, how many examples ``seq`` truncates, packing or padding
    efficiency, the train/eval split and the records dropped, with the reason.

    ``settings`` are the training settings (``seq``, ``packing``, ``eval``, ``seed``, ``batch``, ``task``,
    ``text_column``, ``label_column``, ``chat_template``, ...), checked as ``train`` checks them; ``tokenizer``
    defaults to the one saved beside the model. Images and audio (with the model's ``processor``): the records,
    the split, the classes and the image sizes or clip lengths. Built on the preparation training runs; nothing is trained or
    changed."""
    return DataPreview.of(
        report_data(model, data, tokenizer, eval_data=eval_data, n=n, processor=processor, **settings)
    )


# ------------------------------------------------------------------------------------------------ facts


def _task_words(r: DataReport) -> str:
    words = {"CAUSAL_LM": "causal LM", "SEQ_CLS": "classification", "IMAGE_CLS": "image classification",
             "AUDIO_CLS": "audio classification", "ASR": "speech recognition"}  # fmt: skip
    return words.get(r.task, r.task)


def _headline(r: DataReport) -> str:
    return f"Data preview — {_task_words(r)}, seq {r.seq}, batch {r.batch}{', packing' if r.packing else ''}"


def _split_words(r: DataReport) -> str:
    if r.eval_from == "eval_data":
        held = "from eval_data"
    elif r.eval_from == "split":
        held = "held out of data"
    else:
        held = "no eval split"
    return f"{r.train:,} train · {r.eval:,} eval ({held})"


def _drop_summary(r: DataReport) -> str:
    if not r.dropped:
        return "none"
    parts = [f"{len(d)} × {reason}" for reason, d in r.drop_reasons().items()]
    return f"{len(r.dropped):,} record(s): " + "; ".join(parts)


def _records_shown(drops: list, limit: int = 8) -> str:
    names = [f"{'eval_data' if d.source == 'eval_data' else 'data'}[{d.record}]" for d in drops[:limit]]
    more = f", … (+{len(drops) - limit})" if len(drops) > limit else ""
    return ", ".join(names) + more


def _efficiency_words(r: DataReport) -> str:
    padded = f"{100 * r.padding_efficiency:.0f}%"
    if r.packing and r.packing_efficiency is not None:
        rows = f"{r.rows:,} packed row{'s' if r.rows != 1 else ''}"
        return (
            f"{rows} of up to {r.batch} examples: {100 * r.packing_efficiency:.0f}% real tokens (padded batches "
            f"would hold {padded})"
        )
    batches = f"{r.rows:,} batch{'es' if r.rows != 1 else ''} of {r.batch}"
    if r.padding_efficiency >= 0.9995:
        return f"{batches}: no padding (the examples in each batch are equally long)"
    hint = " (packing: true packs them without padding)" if r.task == "CAUSAL_LM" else ""
    return f"{batches}: {padded} real tokens, {100 * (1 - r.padding_efficiency):.0f}% padding{hint}"


def _facts(r: DataReport) -> list[tuple[str, str]]:
    records = f"{r.n_records:,} in data" + (
        f" + {r.n_eval_records:,} in eval_data" if r.n_eval_records is not None else ""
    )
    if r.media:  # images or audio: what they are, instead of token lengths
        rows = [("records", records), ("split", _split_words(r)), *r.media, ("dropped", _drop_summary(r))]
        return [*rows, ("batches", f"{r.rows:,} batch{'es' if r.rows != 1 else ''} of {r.batch}")]
    n = len(r.lengths)
    truncated = (
        f"{r.truncated:,} of {n:,} examples ({100 * r.truncated_share:.1f}%) are longer than seq {r.seq}"
    )
    tokens = f"{r.tokens:,} in the train examples"
    if r.target_tokens is not None and r.tokens:
        tokens += f"; the loss is on {r.target_tokens:,} ({100 * r.target_tokens / r.tokens:.0f}%)"
    rows = [
        ("records", records),
        ("split", _split_words(r)),
        ("truncated", truncated),
        ("dropped", _drop_summary(r)),
        ("tokens", tokens),
        ("packing" if r.packing else "padding", _efficiency_words(r)),
    ]
    if r.label_names:
        rows.append(("classes", ", ".join(r.label_names)))
    return rows


# ------------------------------------------------------------------------------------------------ histogram


def _nice_width(span: float, bins: int) -> int:
    """A bin width of 1, 2 or 5 × 10^k that splits ``span`` into about ``bins`` bins."""
    raw = max(1.0, span / bins)
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def histogram_bins(
    lengths: tuple[int, ...] | list[int], seq: int, bins: int = 12
) -> list[tuple[int, int, int]]:
    """``(low, high, count)`` bins of token lengths (a length L is in the bin with low <= L <= high), about
    ``bins`` of them, on multiples of a round width; ``seq`` is a bin's upper edge whenever lengths lie on both
    sides of it, so every bin is wholly kept or wholly cut."""
    if not lengths:
        return []
    bottom, top = min(lengths), max(lengths)
    width = _nice_width(top - bottom + 1, bins)
    start = (bottom - 1) // width * width
    edges = list(range(start + width, top + width, width))
    if bottom <= seq < top and seq not in edges:
        bisect.insort(edges, seq)
    counts = [0] * len(edges)
    for length in lengths:
        counts[bisect.bisect_left(edges, length)] += 1
    lows = [start + 1] + [e + 1 for e in edges[:-1]]
    return list(zip(lows, edges, counts, strict=True))


def _length_line(r: DataReport) -> str:
    if not r.lengths:
        return "no tokenized example"
    return (
        f"token lengths of {len(r.lengths):,} examples before the cut: min {min(r.lengths):,} · median "
        f"{statistics.median(r.lengths):,.0f} · max {max(r.lengths):,}; seq {r.seq} cuts {r.truncated:,}"
    )


def histogram_text(r: DataReport, width: int = 30) -> str:
    """A compact text histogram of the token lengths, the bins above ``seq`` marked ✂."""
    found = histogram_bins(r.lengths, r.seq)
    if not found:
        return _length_line(r)
    most = max(count for _, _, count in found) or 1
    label_width = max(len(f"{lo:,}–{hi:,}") for lo, hi, _ in found)
    lines = [_length_line(r)]
    for lo, hi, count in found:
        bar = _BAR * max(1 if count else 0, round(width * count / most))
        mark = "  ✂ cut by seq" if lo > r.seq and count else ""
        lines.append(f"  {f'{lo:,}–{hi:,}':>{label_width}} {bar} {count:,}{mark}")
    return "\n".join(lines)


_PLOTLY_JS_SENT = False  # plotly.js went out with an earlier preview of this process


def _plotly_histogram(r: DataReport, div_id: str) -> str | None:
    """The histogram as a plotly chart's HTML, or None when plotly is missing."""
    global _PLOTLY_JS_SENT
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    found = histogram_bins(r.lengths, r.seq)
    if not found:
        return None
    kept = [(lo, hi, c) for lo, hi, c in found if hi <= r.seq]
    cut = [(lo, hi, c) for lo, hi, c in found if lo > r.seq]
    fig = go.Figure()
    for name, part, color in (("kept whole", kept, "#4c78a8"), (f"cut at seq {r.seq}", cut, "#e45756")):
        if part:
            fig.add_bar(
                x=[(lo + hi) / 2 for lo, hi, _ in part],
                width=[hi - lo + 1 for lo, hi, _ in part],
                y=[c for _, _, c in part],
                name=name,
                marker_color=color,
                customdata=[f"{lo:,}–{hi:,}" for lo, hi, _ in part],
                hovertemplate="%{customdata} tokens: %{y} examples<extra></extra>",
            )
    fig.add_vline(x=r.seq + 0.5, line_dash="dash", line_color="#555", annotation_text=f"seq {r.seq}")
    fig.update_layout(  # no width: the chart fills its container, up to _HIST_MAX_WIDTH (see preview_html)
        height=220,
        margin=dict(l=50, r=20, t=24, b=40),
        bargap=0.05,
        showlegend=bool(cut),
        legend=dict(orientation="h", y=1.15, x=1, xanchor="right"),
        xaxis_title="tokens per example (before the cut)",
        yaxis_title="examples",
        template="plotly_white",
    )
    # A Colab output is a page of its own: it always needs the library. Elsewhere the notebook's page keeps it.
    include = not _PLOTLY_JS_SENT or "google.colab" in sys.modules
    chart = fig.to_html(
        full_html=False,
        include_plotlyjs=include,
        div_id=div_id,
        default_width="100%",
        config={"displayModeBar": False, "responsive": True},
    )
    _PLOTLY_JS_SENT = True
    return chart


# ------------------------------------------------------------------------------------------------ records


def _record_head(v: RecordView, seq: int) -> str:
    if v.split is None:
        length = f" · {v.length:,} tokens" if v.length else ""
        return f"record {v.record} · dropped{length}: {v.dropped}"
    head = f"record {v.record} · {v.split} · {len(v.input_ids):,} tokens"
    if v.cut:
        head += f" (of {v.length:,}: {v.cut:,} cut by seq {seq})"
    if v.label is not None:
        head += f" · label: {v.label}"
    return head


def _record_text(v: RecordView, seq: int) -> list[str]:
    lines = [_record_head(v, seq)]
    if v.split is None:
        return lines
    body = "".join(f"{_MASK_OPEN}{s.text}{_MASK_CLOSE}" if s.trained is False else s.text for s in v.segments)
    if v.cut:
        body += f" ✂ [{v.cut:,} more tokens cut at seq {seq}]"
    lines += ["  " + line for line in body.split("\n")]
    return lines


def _record_html(v: RecordView, seq: int) -> str:
    head = f"<div class='jl-record-head'><b>{html.escape(_record_head(v, seq))}</b></div>"
    if v.split is None:
        return f"<div class='jl-record jl-record-dropped'>{head}</div>"
    spans = []
    for s in v.segments:
        text = html.escape(s.text)
        if s.trained is False:
            spans.append(
                f"<span class='jl-masked' style='{_MASKED_STYLE}' title='label -100: not trained on'>{text}</span>"
            )
        elif s.trained:
            spans.append(f"<span class='jl-trained' title='trained on'>{text}</span>")
        else:
            spans.append(f"<span class='jl-input'>{text}</span>")
    if v.cut:
        spans.append(
            f"<span class='jl-cut' style='{_CUT_STYLE}' title='seq cuts the example here'> ✂ "
            f"{v.cut:,} more tokens cut at seq {seq}</span>"
        )
    body = (
        "<pre class='jl-tokens' style='white-space:pre-wrap;word-break:break-word;max-height:18em;overflow:auto;"
        f"margin:2px 0 8px;padding:4px 6px;border:1px solid #ddd;border-radius:3px'>{''.join(spans)}</pre>"
    )
    return f"<div class='jl-record'>{head}{body}</div>"


# ------------------------------------------------------------------------------------------------ renderings


def preview_text(r: DataReport) -> str:
    """The preview as text: the facts, a text histogram, the first records with masked text in ⟦ ⟧."""
    facts = _facts(r)
    key_width = max(len(k) for k, _ in facts)
    lines = [_headline(r), *(f"  {k:<{key_width}}  {v}" for k, v in facts)]
    for reason, drops in r.drop_reasons().items():
        lines.append(f"  dropped ({reason}): {_records_shown(drops)}")
    if not r.media:
        lines.append(histogram_text(r))
    if r.records:
        masked = (
            f"; text in {_MASK_OPEN} {_MASK_CLOSE} has label -100 (not trained on)"
            if r.task == "CAUSAL_LM"
            else ""
        )
        lines.append(f"first {len(r.records)} record(s) as the model sees them{masked}:")
        for view in r.records:
            lines += _record_text(view, r.seq)
    return "\n".join(lines)


def preview_html(r: DataReport) -> str:
    """The preview as HTML: the facts, a histogram (plotly, with a text fallback), the first records with masked
    tokens greyed."""
    rows = "".join(
        f"<tr><th style='text-align:left;padding:1px 8px'>{html.escape(k)}</th>"
        f"<td style='text-align:left;padding:1px 8px'>{html.escape(v)}</td></tr>"
        for k, v in _facts(r)
    )
    drops = "".join(
        f"<div class='jl-drop'><i>dropped ({html.escape(reason)})</i>: {html.escape(_records_shown(d))}</div>"
        for reason, d in r.drop_reasons().items()
    )
    div_id = f"jl-hist-{uuid.uuid4().hex[:12]}"
    chart = None if r.media else _plotly_histogram(r, div_id)
    fallback = html.escape(histogram_text(r))
    if r.media:
        histogram = ""
    elif chart is None:
        histogram = f"<pre class='jl-hist-text'>{fallback}</pre>"
    else:
        # the text histogram stays for viewers that run no script (a rendered notebook on a website)
        histogram = (
            f"<div class='jl-hist' style='max-width:{_HIST_MAX_WIDTH}'>{chart}"
            f"<pre class='jl-hist-text' id='{div_id}-text'>{fallback}</pre>"
            "<script>(function(){var chart=document.getElementById('" + div_id + "');"
            "if(window.Plotly&&chart){document.getElementById('" + div_id + "-text').style.display='none';}"
            "})();</script></div>"
        )
    legend = ""
    if r.task == "CAUSAL_LM":
        legend = (
            f" — <span class='jl-masked' style='{_MASKED_STYLE}'>grey</span>: label -100, not trained on; "
            "black: trained on"
        )
    records = "".join(_record_html(v, r.seq) for v in r.records)
    heading = (
        f"<div style='margin-top:6px'><b>First {len(r.records)} record(s) as the model sees them</b>{legend}</div>"
        if r.records
        else ""
    )
    return (
        f"<div class='jl-data-preview'><div><b>{html.escape(_headline(r))}</b></div>"
        f"<table class='jl-table'><tbody>{rows}</tbody></table>{drops}{histogram}{heading}{records}</div>"
    )
