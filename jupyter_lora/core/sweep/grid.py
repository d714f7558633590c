"""The runs a sweep plans: ``grid`` (every combination of its values) and ``runs`` (explicit settings), each key
checked against the settings schema (``jupyter_lora.settings``) with its own checks.

``grid`` and ``runs`` together: every explicit run is combined with every point of the grid (``runs × grid``); a
key may not be in both. Either alone: its runs. Neither: one run of the shared settings. A run keeps only the
settings its method uses (``methods.applies``), and runs left with the same settings are one run.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...settings import SETTINGS, keys, name_of, validate_one
from ..errors import UsageError, did_you_mean

__all__ = ["PlannedRun", "plan", "plan_runs", "sweep_keys"]

# settings a sweep fixes itself (where a run writes, how progress shows), or that are notebook objects
_FIXED_BY_SWEEP = ("output_dir", "progress", "keep")


def sweep_keys() -> tuple[str, ...]:
    """The settings a sweep may vary: every inject and training setting of the schema (notebook objects and the
    ones the sweep fixes itself aside) and the sweep's own (method, num_virtual_tokens, quant)."""
    found = [*keys("inject"), *keys("train"), *keys("sweep")]
    return tuple(dict.fromkeys(k for k in found if SETTINGS[k].kind != "object" and k not in _FIXED_BY_SWEEP))


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its index, name and every setting it is given (shared ones included)."""

    index: int
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.settings.get("method", SETTINGS["method"].default)


def _canonical_run(given: Any, where: str, value_where: str | None = None) -> dict[str, Any]:
    """``given`` with canonical names and checked values; errors start with ``where`` (a bad value with
    ``value_where`` when given: the grid names the value's position, ``grid r[2]``)."""
    if not isinstance(given, Mapping):
        raise UsageError(
            f"{where} must be a mapping of settings to values, e.g. {{'r': 8}}; got {given!r:.60}."
        )
    allowed = sweep_keys()
    out: dict[str, Any] = {}
    for key, value in given.items():
        name = name_of(key)
        if name is None or name not in allowed:
            if name in _FIXED_BY_SWEEP or (name is not None and SETTINGS[name].kind == "object"):
                raise UsageError(
                    f"{where}: `{key}` is the same for every run of a sweep; give it to sweep() itself."
                )
            spellings = allowed + tuple(a for n in allowed for a in SETTINGS[n].aliases)
            raise UsageError(
                f"{where}: unknown setting `{key}`.{did_you_mean(str(key), spellings)} A sweep varies inject and "
                f"training settings and method, num_virtual_tokens, quant."
            )
        out[name] = _value(name, value, value_where or where)
    return out


def _value(name: str, value: Any, where: str) -> Any:
    if name == "quant":
        return _quant(value, where)
    try:
        return validate_one(name, value)
    except UsageError as exc:  # the schema's message, prefixed with the entry it came from
        raise type(exc)(f"{where}: {exc}") from None


def _quant(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none") or value is False:
        return None
    if value != "4bit":
        raise UsageError(f"{where}: `quant` in a sweep is 4bit or none, got {value!r}.")
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"{where}: `quant: 4bit` needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); this machine "
            f"has {'no CUDA GPU' if not torch.cuda.is_available() else 'no bitsandbytes'}. Drop 4bit from the sweep."
        )
    return "4bit"


def _grid_points(grid: Any) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if not isinstance(grid, Mapping) or not grid:
        raise UsageError(
            f"`grid` must be a mapping of settings to lists of values, e.g. {{'r': [4, 8]}}; got {grid!r:.60}."
        )
    names, values = [], []
    for key, options in grid.items():
        options = list(options) if isinstance(options, (list, tuple)) else [options]
        if not options:
            raise UsageError(f"`grid`: `{key}` has no values; give a list like [4, 8].")
        checked = [_canonical_run({key: v}, "`grid`", f"`grid` {key}[{j}]") for j, v in enumerate(options)]
        names.append(next(iter(checked[0])))
        values.append([next(iter(c.values())) for c in checked])
    if len(set(names)) != len(names):
        raise UsageError("`grid` names one setting twice (under two spellings); keep one.")
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def _slug(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9.,_+-]+", "_", text)[:40]


def varying_settings(runs: list[Mapping[str, Any]]) -> tuple[str, ...]:
    """The settings that differ between the runs that use them (a setting a run's method does not use is no
    difference: its column shows "—" for that run)."""
    from .methods import applies

    def method(c: Mapping[str, Any]) -> str:
        return c.get("method", SETTINGS["method"].default)

    names = dict.fromkeys(k for c in runs for k in c)
    return tuple(k for k in names if len({repr(c.get(k)) for c in runs if applies(method(c), k)}) > 1)


def plan_runs(grid: Any, runs: Any, shared: Mapping[str, Any]) -> list[PlannedRun]:
    """The planned runs (see ``plan``)."""
    return plan(grid, runs, shared)[0]


def plan(grid: Any, runs: Any, shared: Mapping[str, Any]) -> tuple[list[PlannedRun], str]:
    """The planned runs: ``runs × grid`` over the ``shared`` settings; every value checked, the settings a run's
    method does not use dropped and the runs that are then the same merged, names made from the settings that vary
    between runs. Also a note of what was dropped (``r does not apply to full, ia3: 14 → 9 runs``), or ''."""
    from .methods import applies

    base = _canonical_run(shared, "sweep()") if shared else {}
    points = _grid_points(grid)
    explicit = [{}] if runs is None else runs
    if not isinstance(explicit, (list, tuple)) or not explicit:
        raise UsageError(
            f"`runs` must be a list of settings mappings, e.g. [{{'r': 4}}, {{'method': 'full'}}]; got {runs!r:.60}."
        )
    combined = []
    for i, run in enumerate(explicit):
        own = _canonical_run(run, f"`runs[{i}]`")
        for point in points:
            both = sorted(set(own) & set(point))
            if both:
                raise UsageError(
                    f"`{both[0]}` is in both `grid` and `runs[{i}]`; a run is each explicit run combined with every "
                    "grid point, so give it in one of them."
                )
            combined.append({**base, **point, **own})
    ignored: dict[str, list[str]] = {}  # setting -> the methods that do not use it
    effective, seen = [], set()
    for settings in combined:
        method = settings.get("method", SETTINGS["method"].default)
        kept = {k: v for k, v in settings.items() if applies(method, k)}
        for k in (k for k in settings if k not in kept):
            if method not in ignored.setdefault(k, []):
                ignored[k].append(method)
        key = repr(sorted(kept.items()))
        if key not in seen:
            seen.add(key)
            effective.append(kept)
    varying = varying_settings(effective)
    planned = []
    for i, settings in enumerate(effective):
        method = settings.get("method", SETTINGS["method"].default)
        parts = [method] + [f"{k}={_slug(settings[k])}" for k in varying if k != "method" and k in settings]
        # a run's name is also its directory and, when kept, its adapter's name: letters, digits, _ and - only
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{i + 1:02d}-" + "-".join(parts))
        planned.append(PlannedRun(i, name, settings))
    note = "; ".join(f"{k} does not apply to {', '.join(methods)}" for k, methods in ignored.items())
    if note and len(effective) != len(combined):
        note += f": {len(combined)} → {len(effective)} runs"
    return planned, note
