"""The LoRA panel: module tree, rank/alpha/dropout sliders, variant and init, a live summary (trainable params,
adapter size, GPU memory by component) and buttons for inject / train / merge / save / unload — all calling the
public API on the model the panel is bound to. ``%lora panel model`` or ``jupyter_lora.Panel(model)``.
"""

from __future__ import annotations

import contextlib
import html
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import ipywidgets as w

from ..core.errors import UsageError
from ..display import fmt_bytes, fmt_count
from ..settings import SETTINGS, Setting, canonical, panel_keys, validate, validate_one
from .tree import ModuleTree

__all__ = ["Panel"]

_MEMORY_PARTS = (
    ("weights", "base weights", "#90a4ae"),
    ("adapter", "adapter", "#42a5f5"),
    ("gradients", "gradients", "#7e57c2"),
    ("optimizer", "optimizer", "#ab47bc"),
    ("activations", "activations", "#ffa726"),
    ("logits", "logits", "#ef5350"),
    ("other", "overhead", "#bdbdbd"),
)


def _spec_text(value: Any) -> str:
    """A target or layer spec as the text the tree's box shows."""
    if value is None:
        return ""
    return ", ".join(str(x) for x in value) if isinstance(value, (list, tuple)) else str(value)


def _follow_after_cells(panel: Panel) -> None:
    """Have ``panel`` follow its variable after every cell of the IPython shell it lives in (a weak reference:
    the hook goes away with the panel)."""
    if panel.namespace is None:
        return
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    shell = get_ipython()
    if shell is None or shell.user_ns is not panel.namespace:
        return
    ref = weakref.ref(panel)

    def after_cell(*args: Any) -> None:
        alive = ref()
        if alive is None:
            with contextlib.suppress(ValueError):
                shell.events.unregister("post_run_cell", after_cell)
            return
        alive._after_cell(*args)

    shell.events.register("post_run_cell", after_cell)


def _adapter_settings(model: Any, name: str) -> dict[str, Any]:
    """The panel settings of the adapter ``name`` that ``model`` holds ({} when it holds none)."""
    from jupyter_lora.core.adapters.peft_facts import variant_of, wrapper_for

    peft_model = wrapper_for(model)
    config = getattr(peft_model, "peft_config", {}).get(name) if peft_model is not None else None
    if config is None or not hasattr(config, "r"):
        return {}
    found: dict[str, Any] = {
        "r": int(config.r),
        "alpha": float(config.lora_alpha),
        "dropout": float(config.lora_dropout),
        "variant": variant_of(config),
    }
    targets = config.target_modules
    if isinstance(targets, (set, list, tuple)) and targets:
        found["targets"] = ", ".join(sorted({str(t).rsplit(".", 1)[-1] for t in targets}))
    layers = config.layers_to_transform
    if layers is not None:
        found["layers"] = [layers] if isinstance(layers, int) else list(layers)
    try:
        return {k: validate_one(k, v) for k, v in found.items()}
    except Exception:  # an adapter whose settings the panel cannot show: open on the defaults
        return {}


def _control(setting: Setting, value: Any) -> w.Widget:
    """The control for one setting, from its declaration: choices -> a dropdown, a number with a panel range ->
    a slider (or a bounded box when the range is wide), a flag -> a checkbox, an object -> a text box."""
    label = setting.label or setting.name.replace("_", " ")
    common = {"description": label, "tooltip": setting.help, "style": {"description_width": "70px"}}
    if setting.kind in ("choice", "auto_bool"):
        words = {"auto": "auto", True: "on", False: "off", None: "as loaded"}
        options = [(words.get(c, str(c)), c) for c in setting.choices]
        if (
            value not in setting.choices and value is not None
        ):  # a valid value beyond the list (pissa_niter_4)
            options.append((str(value), value))
        if setting.nullable and None not in setting.choices:
            options.insert(0, (words[None], None))
        return w.Dropdown(options=options, value=value, **common)
    if setting.kind == "bool":
        return w.Checkbox(value=bool(value), description=label, indent=False)
    if setting.kind in ("int", "float"):
        lo, hi, step = setting.panel_range or (setting.minimum or 0, 10**7, 1)
        if value is not None:  # a value the settings allow but the usual range does not show
            lo, hi = min(lo, value), max(hi, value)
        if setting.kind == "int" and (hi - lo) / step > 1000:
            if setting.nullable:  # 0 stands for "not set" (e.g. steps: train by epochs)
                lo, common["tooltip"] = 0, f"{setting.help} (0: not set)"
            return w.BoundedIntText(value=value if value is not None else 0, min=int(lo), max=int(hi),
                                    layout=w.Layout(width="170px"), **common)  # fmt: skip
        if setting.kind == "int":
            return w.IntSlider(
                value=value, min=int(lo), max=int(hi), step=int(step), continuous_update=True, **common
            )
        return w.FloatSlider(value=value if value is not None else lo, min=lo, max=hi, step=step, **common)
    return w.Text(value="" if value is None else str(value), placeholder=setting.help,
                  layout=w.Layout(width="240px"), **common)  # fmt: skip


def _pow2(value: int) -> int:
    """The power of two nearest to ``value`` (1..256)."""
    return min((1 << k for k in range(9)), key=lambda p: (abs(p - value), -p))  # ties round up


class Panel:
    """An interactive panel bound to a model. ``namespace``/``variable``: keep ``namespace[variable]`` pointing at
    the current model after Inject, Merge, Load or Unload (what ``%lora panel`` passes); ``on_change(model)`` is
    called then too. ``panel.model`` is always the current model."""

    def __init__(
        self,
        model: Any,
        *,
        variable: str = "model",
        namespace: MutableMapping[str, Any] | None = None,
        on_change: Callable[[Any], None] | None = None,
        tokenizer: Any = None,
        name: str = "default",
        train_settings: Mapping[str, Any] | None = None,
        **settings: Any,
    ):
        """``settings``: starting values of the panel's controls (r, alpha, targets, seq, batch, ...; see
        ``jupyter_lora.settings``); the rest start at their defaults. ``train_settings``: the other training
        settings the Train button uses (lr, epochs, ...; what ``%config LoraMagics.default_*`` changed)."""
        from jupyter_lora.core.modelinfo import require_module
        from jupyter_lora.core.targets import index_model

        from .. import api as jl
        from .tree import tree_rows

        given = {k: validate_one(k, v) for k, v in canonical(settings, panel_keys(), "panel setting").items()}
        # a model that already holds the adapter opens on that adapter's settings: Re-inject then changes it
        held = _adapter_settings(require_module(model), name)
        given.update(held)
        values = {name: given.get(name, SETTINGS[name].default) for name in panel_keys()}
        self.model = require_module(model)
        self.variable = variable
        self.namespace = namespace
        self.on_change = on_change
        self.adapter_name = name
        self.train_settings = dict(validate(train_settings or {}, "train"))
        self.tokenizer = tokenizer
        self.run = None
        self.last_update_ms = 0.0
        self._syncing = False
        self._jl = jl
        self.model_gone = False  # the variable no longer holds a model (see follow)
        self._stale = False  # the summary shows the last valid settings' figures, not the controls'
        self._held: tuple | None = None  # the plan of the adapter the model holds, when the panel knows it
        index = index_model(self.model)

        self.tree = ModuleTree(
            nodes=tree_rows(self.model), block_lists=list(index.layer_lists), num_layers=index.num_layers,
            targets=_spec_text(values["targets"]) or "qv", layers=_spec_text(values["layers"]),
        )  # fmt: skip
        # One control per setting the panel shows, built from its declaration (the tree holds targets/layers).
        self.controls: dict[str, w.Widget] = {
            name: _control(SETTINGS[name], values[name])
            for name in panel_keys()
            if name not in ("targets", "layers")
        }
        self.controls["targets"], self.controls["layers"] = self.tree, self.tree
        self.r, self.dropout, self.variant, self.init = (
            self.controls[k] for k in ("r", "dropout", "variant", "init")
        )
        self.batch, self.seq, self.ckpt, self.optim, self.quant = (
            self.controls[k] for k in ("batch", "seq", "ckpt", "optim", "quant")
        )
        self.steps, self.data = self.controls["steps"], self.controls["data"]
        alpha = values["alpha"]
        self.alpha = self.controls["alpha"]
        self.alpha.value = alpha if alpha is not None else 2 * self.r.value
        self.alpha.disabled = alpha is None
        self.pow2 = w.Checkbox(
            value=False, description="powers of 2", indent=False, layout=w.Layout(width="110px")
        )
        self.alpha_lock = w.Checkbox(value=alpha is None, description="alpha = 2r", indent=False,
                                     layout=w.Layout(width="110px"))  # fmt: skip
        self.summary = w.HTML(layout=w.Layout(min_height="120px"))
        self.error = w.HTML()
        self.inject_button = w.Button(description="Inject", button_style="primary", icon="plus")
        self.train_button = w.Button(description="Train", icon="play")
        self.merge_button = w.Button(description="Merge", icon="compress")
        self.save_button = w.Button(description="Save", icon="save")
        self.unload_button = w.Button(description="Unload", icon="trash")
        self.code_button = w.ToggleButton(description="Show as code", icon="code")
        self.save_path = w.Text(value="adapters/run1", description="path", style={"description_width": "35px"},
                                layout=w.Layout(width="240px"))  # fmt: skip
        self.code = w.Textarea(layout=w.Layout(width="100%", height="170px", display="none"))
        self.progress_area = w.VBox()

        for key, widget in self.controls.items():
            if widget is not self.tree and key not in ("data", "steps"):
                widget.observe(self._on_control, names="value")
        self.pow2.observe(self._on_pow2, names="value")
        self.alpha_lock.observe(self._on_lock, names="value")
        self.tree.observe(self._on_control, names=["targets", "layers"])
        self.code_button.observe(self._on_code, names="value")
        self.inject_button.on_click(self._guard(self._inject))
        self.train_button.on_click(self._guard(self._train))
        self.merge_button.on_click(self._guard(self._merge))
        self.save_button.on_click(self._guard(self._save))
        self.unload_button.on_click(self._guard(self._unload))

        controls = w.VBox([
            w.HBox([self.r, self.pow2]), w.HBox([self.alpha, self.alpha_lock]), self.dropout,
            w.HBox([self.variant, self.init]),
            w.HTML("<b>memory for training with</b>"), w.HBox([self.batch, self.seq]),
            w.HBox([self.ckpt, self.quant]), self.optim,
            self.summary,
        ], layout=w.Layout(width="460px"))  # fmt: skip
        actions = w.VBox([
            w.HBox([self.inject_button, self.merge_button, self.unload_button, self.code_button]),
            w.HBox([self.save_path, self.save_button]),
            w.HBox([self.data, self.steps, self.train_button]),
        ])  # fmt: skip
        self.box = w.VBox(
            [w.HBox([self.tree, controls], layout=w.Layout(align_items="flex-start")), self.error, actions,
             self.code, self.progress_area],
            layout=w.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="6px"),
        )  # fmt: skip
        self.box.add_class("jl-panel")
        self.plan = None
        self.estimate = None
        self.update()
        if held and self.plan is not None:  # opened on the adapter the model holds
            self._held = self._plan_key(self.plan)
            self.summary.value = self._summary_html(self.plan, self.estimate)
        _follow_after_cells(self)

    # --------------------------------------------------------------------------------------- state

    def settings(self) -> dict[str, Any]:
        """The LoRA settings the controls describe (what Inject would use)."""
        out: dict[str, Any] = {
            "r": int(self.r.value),
            "dropout": round(float(self.dropout.value), 4),
            "targets": self.tree.targets.strip(),  # empty: an error in the panel, not a silent default
            "variant": self.variant.value,
            "init": self.init.value,
        }
        if not self.alpha_lock.value:
            out["alpha"] = float(self.alpha.value)
        if self.tree.layers.strip():
            out["layers"] = self.tree.layers.strip()
        return out

    def estimate_settings(self) -> dict[str, Any]:
        """What the memory figure assumes: the training settings (batch, seq, ckpt, optim) and the base."""
        return {k: self.controls[k].value for k in ("seq", "batch", "ckpt", "optim", "quant")}

    def update(self) -> None:
        """Re-plan and re-estimate from the controls; show the numbers (or the error) in the panel."""
        start = time.perf_counter()
        jl = self._jl
        try:
            plan = jl.plan(self.model, name=self.adapter_name, **self.settings())
            estimate = jl.estimate(self.model, plan, **self.estimate_settings())
        except UsageError as exc:
            with self.tree.hold_sync():
                self.tree.error = str(exc)
            self.error.value = ""
            if not self._stale and self.plan is not None:  # the numbers shown are no longer the settings'
                self._stale = True
                self.summary.value = (
                    f"<div class='jl-stale' style='opacity:.45'>{self.summary.value}</div>"
                    "<div class='jl-stale-note' style='color:#666;font-size:90%'>these figures are for the last "
                    "valid settings</div>"
                )
            self.last_update_ms = 1000 * (time.perf_counter() - start)
            return
        self._stale = False
        self.plan, self.estimate = plan, estimate
        with self.tree.hold_sync():
            self.tree.error = ""
            self.tree.selected = list(plan.targets)
        self.summary.value = self._summary_html(plan, estimate)
        if self.code_button.value:
            self.code.value = self.as_code()
        self._refresh_buttons()
        self.last_update_ms = 1000 * (time.perf_counter() - start)

    def as_code(self) -> str:
        """The ``%%lora`` cell that injects what the panel shows."""
        lines = [
            f"%%lora {self.variable}"
            + (f" --name {self.adapter_name}" if self.adapter_name != "default" else "")
        ]
        for key, value in self.settings().items():
            if value is None or value == SETTINGS[key].default:
                continue
            lines.append(f"{key}: {value:g}" if isinstance(value, float) else f"{key}: {value}")
        return "\n".join(lines)

    # --------------------------------------------------------------------------------------- rendering

    def _summary_html(self, plan, estimate) -> str:
        b = estimate.breakdown
        parts = {
            "weights": b["weights"] + b["quant_constants"], "adapter": b["adapter"], "gradients": b["gradients"],
            "optimizer": b["optimizer"], "activations": b["activations"], "logits": b["logits"],
            "other": b["overhead"] + b["cuda_context"],
        }  # fmt: skip
        total = sum(parts.values())
        scale = max(total, estimate.gpu_capacity_bytes or 0) or 1
        bar = "".join(
            f"<div title='{label}: {fmt_bytes(parts[key])}' style='width:{100 * parts[key] / scale:.2f}%;"
            f"background:{color};height:14px'></div>"
            for key, label, color in _MEMORY_PARTS if parts[key]
        )  # fmt: skip
        legend = " ".join(
            f"<span style='white-space:nowrap'><span style='display:inline-block;width:9px;height:9px;"
            f"background:{color}'></span> {label} {fmt_bytes(parts[key])}</span>"
            for key, label, color in _MEMORY_PARTS if parts[key]
        )  # fmt: skip
        capacity = ""
        if estimate.gpu_capacity_bytes:
            verdict = "fits" if estimate.fits else "does not fit"
            capacity = (f" of {fmt_bytes(estimate.gpu_capacity_bytes)} on {html.escape(estimate.gpu_name or 'GPU')}"
                        f" — <b>{verdict}</b>")  # fmt: skip
        if not plan.replaces:
            state = "new adapter"
        elif self._held == self._plan_key(plan):
            state = "the adapter the model holds"
        else:
            state = "Re-inject replaces the adapter"
        return (
            f"<div class='jl-summary'><div><b class='jl-trainable'>{plan.trainable_params:,}</b> trainable of "
            f"{plan.total_params:,} (<span class='jl-percent'>{100 * plan.trainable_fraction:.3g}%</span>) · "
            f"{len(plan.targets)} modules · adapter "
            f"<span class='jl-adapter-bytes'>{fmt_bytes(plan.adapter_bytes)}</span> · {state}</div>"
            f"<div style='margin-top:4px'>training ≈ <b class='jl-memory'>{fmt_bytes(total)}</b>{capacity}</div>"
            f"<div class='jl-membar' style='display:flex;width:100%;background:#eee;margin:3px 0'>{bar}</div>"
            f"<div style='font-size:90%'>{legend}</div>"
            f"<div style='font-size:90%;color:#666'>{fmt_count(plan.adapter_params)} LoRA params, "
            f"r={plan.spec.r}, alpha={plan.spec.lora_alpha:g}</div></div>"
        )

    def _refresh_buttons(self) -> None:
        from jupyter_lora.core.modelinfo import is_peft_model

        # The panel's own model is a PeftModel exactly when it holds adapters (inject returns one).
        names = set(getattr(self.model, "peft_config", {})) if is_peft_model(self.model) else set()
        has = bool(names)
        training = self.run is not None and self.run.running
        if self.model_gone:
            for button in (self.inject_button, self.merge_button, self.save_button, self.unload_button,
                           self.train_button):  # fmt: skip
                button.disabled = True
            return
        self.inject_button.description = "Re-inject" if self.adapter_name in names else "Inject"
        self.inject_button.disabled = training
        for button in (self.merge_button, self.save_button, self.unload_button, self.train_button):
            button.disabled = not has or training

    def _show_error(self, message: str) -> None:
        self.error.value = f"<div class='jl-panel-error' style='color:#c62828'>{html.escape(message)}</div>"

    # --------------------------------------------------------------------------------------- events

    def _on_control(self, change: dict) -> None:
        if self._syncing:
            return
        if change.get("owner") is self.r and self.alpha_lock.value:
            self._syncing = True  # alpha follows r: one update for the pair, not two
            try:
                self.alpha.value = 2 * self.r.value
            finally:
                self._syncing = False
        self.update()

    def _on_pow2(self, change: dict) -> None:
        if change["new"]:
            self.r.value = _pow2(int(self.r.value))

    def _on_lock(self, change: dict) -> None:
        self.alpha.disabled = bool(change["new"])
        if change["new"]:
            self.alpha.value = 2 * self.r.value
        self.update()

    def _on_code(self, change: dict) -> None:
        self.code.layout.display = "" if change["new"] else "none"
        if change["new"]:
            self.code.value = self.as_code()

    def _guard(self, action: Callable[[], None]) -> Callable[[Any], None]:
        """Button callbacks: errors appear in the panel, in words, never as a lost exception."""

        def handler(_button=None) -> None:
            self.error.value = ""
            try:
                self.follow()
                if self.model_gone:  # the variable no longer holds a model: nothing to act on
                    self._show_gone()
                    return
                action()
            except UsageError as exc:
                self._show_error(str(exc))
            except Exception as exc:
                self._show_error(f"{type(exc).__name__}: {exc}")
            finally:
                self._refresh_buttons()

        return handler

    def follow(self) -> bool:
        """Take up the model the variable holds now, when something else (a magic, a cell) replaced it — a merge,
        an unload, a new inject. Returns whether it changed. Runs after every cell and before every action."""
        if self.namespace is None:
            return False
        current = self.namespace.get(self.variable)
        if current is self.model:
            return False
        if not callable(
            getattr(current, "named_modules", None)
        ):  # not a torch module (torch is not imported here)
            self.model_gone = True
            self._refresh_buttons()
            self._show_gone()
            return True
        self.model_gone = False
        self.model = current
        self._held = None
        self.update()
        held = _adapter_settings(current, self.adapter_name)
        if (
            held
            and self.plan is not None
            and all(self.settings().get(k) == v for k, v in held.items() if k in ("r", "variant"))
        ):
            self._held = self._plan_key(self.plan)
            self.summary.value = self._summary_html(self.plan, self.estimate)
        self._refresh_buttons()
        return True

    def _show_gone(self) -> None:
        self._show_error(
            f"`{self.variable}` no longer holds a model: the panel is off. Open a new one with %lora panel."
        )

    def _after_cell(self, *_: Any) -> None:
        with contextlib.suppress(Exception):  # never break the user's cell
            self.follow()

    def _rebind(self, model: Any) -> None:
        self.model = model
        if self.namespace is not None:
            self.namespace[self.variable] = model
        if self.on_change is not None:
            self.on_change(model)
        self.update()

    # --------------------------------------------------------------------------------------- actions

    def inject(self) -> None:
        """Inject (or re-inject) the adapter the controls describe."""
        self._guard(self._inject)()

    def _inject(self) -> None:
        self.update()
        if self.plan is None or self._stale:  # the error is shown where it is (the targets box)
            raise UsageError("Nothing injected: fix the settings above first.")
        replaced = self.plan.replaces
        plan = self.plan
        self._rebind(self._jl.inject(self.model, plan=plan))
        self._held = self._plan_key(plan)
        self.summary.value = self._summary_html(self.plan, self.estimate)
        modules = len(plan.targets)
        self.error.value = (
            f"<div class='jl-panel-note' style='color:#2e7d32'>{'Re-injected' if replaced else 'Injected'} "
            f"adapter '{html.escape(self.adapter_name)}' into `{html.escape(self.variable)}`: r={plan.spec.r}, "
            f"alpha={plan.spec.lora_alpha:g}, {modules} modules, {plan.trainable_params:,} trainable.</div>"
        )

    @staticmethod
    def _plan_key(plan: Any) -> tuple:
        return (plan.spec, tuple(plan.target_modules))

    def _merge(self) -> None:
        self._rebind(self._jl.merge(self.model))

    def _unload(self) -> None:
        self._rebind(self._jl.unload(self.model))

    def _save(self) -> None:
        path = self._jl.save(self.model, self.save_path.value)
        self.error.value = (
            f"<div class='jl-panel-note' style='color:#2e7d32'>saved to {html.escape(str(path))}</div>"
        )

    def _train(self) -> None:
        from .progress import progress_observer

        name = self.data.value.strip()
        if not name:
            raise UsageError(
                "Name the training data: a variable holding texts or records (the `data` field)."
            )
        if self.namespace is None or name not in self.namespace:
            raise UsageError(f"No variable `{name}` for the training data.")
        holder: dict[str, Any] = {}
        observer = progress_observer(stop=lambda: holder["run"].stop(wait=False), mode="widget")
        tokenizer = self.tokenizer if self.tokenizer is not None else self._find_tokenizer()
        settings = {k: self.controls[k].value for k in ("steps", "batch", "seq", "ckpt", "optim")}
        settings["steps"] = settings["steps"] or None  # 0: train by epochs
        run = self._jl.train(self.model, self.namespace[name], tokenizer=tokenizer,
                             **{**self.train_settings, **settings},
                             observers=[observer, self._on_training_event])  # fmt: skip
        holder["run"] = self.run = run
        self.progress_area.children = [getattr(observer, "box", w.HTML(repr(observer)))]

    def _on_training_event(self, event) -> None:
        if event.kind == "end":
            self._refresh_buttons()

    def _find_tokenizer(self) -> Any:
        import sys

        base = sys.modules.get("transformers.tokenization_utils_base")
        if base is None or self.namespace is None:
            return None
        found = [
            v
            for k, v in self.namespace.items()
            if not k.startswith("_") and isinstance(v, base.PreTrainedTokenizerBase)
        ]
        return found[0] if len(found) == 1 else None

    # --------------------------------------------------------------------------------------- display

    def show(self) -> None:
        from IPython.display import display

        display(self.box)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        trainable = f"{self.plan.trainable_params:,} trainable" if self.plan else "no plan"
        return f"<jupyter_lora.Panel for `{self.variable}`: {trainable}, targets={self.tree.targets!r}>"
