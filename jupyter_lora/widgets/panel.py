"""The LoRA panel, in three tabs. "Adapter": module tree, rank/alpha/dropout sliders, variant and init, a live
summary (trainable params, adapter size, GPU memory by part), the training form (every training setting, built from
the settings schema) and buttons for inject / train / merge / save / unload — all calling the public API on the
model the panel is bound to; "Show as code" gives the same as Python calls and as ``%%lora`` cells. "Data": the data
preview (``jupyter_lora.preview_data``) of the data the form names, with the form's settings, on demand. "Chat": the
chat widget (``jupyter_lora.chat``) for the panel's model, built when the tab is first opened.
``%lora panel model``, ``jupyter_lora.panel(model)`` or ``jupyter_lora.Panel(model)``.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import ipywidgets as w

from ..core.errors import UsageError, did_you_mean
from ..display import adapter_size, fmt_bytes, fmt_count, memory_parts
from ..settings import SETTINGS, Setting, canonical, form_sections, keys, panel_keys, validate, validate_one
from .tree import ModuleTree, front_end_source, panel_stylesheet

__all__ = ["Panel", "panel"]

_PART_COLORS = {
    "weights": "#90a4ae",
    "adapter": "#42a5f5",
    "gradients": "#7e57c2",
    "optimizer": "#ab47bc",
    "activations": "#ffa726",
    "logits": "#ef5350",
    "other": "#bdbdbd",
}
_FORM_LABEL_WIDTH = "140px"  # the longest label ("grad. checkpointing") whole
_FORM_COLUMNS = "repeat(auto-fill, minmax(270px, 1fr))"
TABS = ("Adapter", "Data", "Chat")  # the panel's tabs, in order
_PREVIEW_N = 3  # records the Data tab shows at first (preview_data's default)


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
    from jupyter_lora.core.adapters.inspection import held_settings

    try:
        found = held_settings(model, name)
        if found.get("layers") is not None:
            found["layers"] = list(found["layers"])
        return {k: validate_one(k, v) for k, v in found.items() if v is not None}
    except Exception:  # an adapter whose settings the panel cannot show: open on the defaults
        return {}


def _control(setting: Setting, value: Any) -> w.Widget:
    """The control beside the tree for one setting, from its declaration: choices -> a dropdown, a number with a
    panel range -> a slider, a flag -> a checkbox, anything else -> a text box. Each grows with the column and wraps
    to the next line rather than shrink below a usable width."""
    label = setting.label or setting.name.replace("_", " ")
    common = {"description": label, "tooltip": _tooltip(setting), "style": {"description_width": "70px"}}
    if setting.kind in ("choice", "auto_bool"):
        words = {"auto": "auto", True: "on", False: "off", None: "as loaded"}
        options = [(words.get(c, str(c)), c) for c in setting.choices]
        if (
            value not in setting.choices and value is not None
        ):  # a valid value beyond the list (pissa_niter_4)
            options.append((str(value), value))
        if setting.nullable and None not in setting.choices:
            options.insert(0, (words[None], None))
        return _dropdown(options, value, layout=_grow("150px"), **common)
    if setting.kind == "bool":
        return w.Checkbox(value=bool(value), description=label, indent=False, layout=_fixed())
    if setting.kind in ("int", "float") and setting.panel_range:
        lo, hi, step = setting.panel_range
        if value is not None:  # a value the settings allow but the usual range does not show
            lo, hi = min(lo, value), max(hi, value)
        slider = w.IntSlider if setting.kind == "int" else w.FloatSlider
        return slider(value=value if value is not None else lo, min=lo, max=hi, step=step,
                      continuous_update=True, layout=_grow("260px"), **common)  # fmt: skip
    return w.Text(value="" if value is None else str(value), placeholder=setting.help, layout=_grow("240px"),
                  **common)  # fmt: skip


def _dropdown(options: list[tuple[str, Any]], value: Any, **kwargs: Any) -> w.Dropdown:
    # by index: a Dropdown given value=None shows no selection, even with an option whose value is None
    return w.Dropdown(options=options, index=[v for _, v in options].index(value), **kwargs)


def _grow(basis: str) -> w.Layout:
    """A control that takes the room its row has, and no less than ``basis`` (its row wraps instead)."""
    return w.Layout(flex=f"1 1 {basis}", min_width=basis, width="auto")


def _fixed() -> w.Layout:
    return w.Layout(flex="0 0 auto", width="auto")


def _row(children: list[w.Widget]) -> w.HBox:
    row = w.HBox(children, layout=w.Layout(align_items="center", width="100%"))
    row.add_class("jl-wrap")
    return row


def _tooltip(setting: Setting) -> str:
    """A control's tooltip, from its declaration: the help, the values allowed, the default, the other names."""
    from ..magics.parse import write_value

    default = setting.default
    shown = (
        "not set"
        if default is None
        else write_value(list(default) if isinstance(default, tuple) else default)
    )
    also = f" Also spelled {', '.join(setting.aliases)}." if setting.aliases else ""
    return f"{setting.help}. Allowed: {setting.describe()}. Default: {shown}.{also}"


def _form_control(setting: Setting, value: Any) -> w.Widget:
    """The training form's control for one setting, from its declaration: choices -> a dropdown, a flag -> a
    checkbox (a dropdown with "default" when it may be unset), anything else -> a text box read as a cell body
    reads the value (``2e-4``, ``[a, b]``, ``true``), empty for the default, so that a wrong value can be typed and
    is marked with the schema's own message."""
    label = setting.label or setting.name.replace("_", " ")
    common = {
        "description": label,
        "tooltip": _tooltip(setting),
        "style": {"description_width": _FORM_LABEL_WIDTH},
        "layout": w.Layout(width="auto", min_width="0"),
    }
    if setting.kind in ("choice", "auto_bool") or (setting.kind == "bool" and setting.nullable):
        words = {"auto": "auto", True: "on", False: "off", None: "default"}
        choices = setting.choices or (True, False)
        options = [(words.get(c, str(c)), c) for c in choices]
        if setting.nullable and None not in choices:
            options.insert(0, (words[None], None))
        if value not in [v for _, v in options]:
            options.append((str(value), value))
        return _dropdown(options, value, **common)
    if setting.kind == "bool":
        return w.Checkbox(value=bool(value), indent=False, **common)
    return w.Text(value=_form_text(setting, value), placeholder=_placeholder(setting), continuous_update=True,
                  **common)  # fmt: skip


def _form_text(setting: Setting, value: Any) -> str:
    """What a text box shows for ``value``: nothing for the default, else the value as a cell body writes it."""
    from ..magics.parse import write_value

    if value is None or value == setting.default:
        return ""
    if setting.kind == "text" or (setting.kind == "object" and isinstance(value, str)):
        return str(value)
    return write_value(list(value) if isinstance(value, tuple) else value)


def _placeholder(setting: Setting) -> str:
    from ..magics.parse import write_value

    if setting.kind == "object" or setting.default is None or setting.default == ():
        return f"e.g. {setting.example}"
    return f"{write_value(setting.default)} (default)"


def _pow2(value: int) -> int:
    """The power of two nearest to ``value`` (1..256)."""
    return min((1 << k for k in range(9)), key=lambda p: (abs(p - value), -p))  # ties round up


def _python_value(setting: Setting, value: Any) -> str:
    """A setting's value as Python source: a notebook variable by its name, anything else as a literal."""
    if setting.kind == "object" and isinstance(value, str) and value.isidentifier():
        return value
    return repr(list(value) if isinstance(value, tuple) else value)


class Panel:
    """An interactive panel bound to a model, in the tabs ``TABS``. ``namespace``/``variable``: keep
    ``namespace[variable]`` pointing at the current model after Inject, Merge, Load or Unload (what ``%lora panel``
    passes); ``on_change(model)`` is called then too. ``panel.model`` is always the current model; ``preview()``
    does what the Data tab's Preview button does, ``open_chat()`` what opening the Chat tab does."""

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
        chat_settings: Mapping[str, Any] | None = None,
        **settings: Any,
    ):
        """``settings``: starting values of the controls — the adapter's (r, alpha, targets, ...) and the training
        form's (lr, steps, batch, seq, data as a variable name, ...; see ``jupyter_lora.settings``); the rest start
        at their defaults. ``train_settings``: more starting values of the training form (what
        ``%config LoraMagics.default_*`` changed). ``chat_settings``: the Chat tab's starting settings
        (temperature, top_p, max_new_tokens, adapter, ...; as ``jupyter_lora.chat`` takes them)."""
        from jupyter_lora.core.modelinfo import require_module
        from jupyter_lora.core.targets import index_model

        from .. import api as jl
        from .tree import tree_rows

        in_form = tuple(n for _, _, _, names in form_sections() for n in names)
        given = canonical(settings, panel_keys() + in_form, "panel setting")
        column = {k: validate_one(k, v) for k, v in given.items() if k in panel_keys()}
        trained = {**canonical(train_settings or {}, keys("train"), "training setting")}
        trained.update({k: v for k, v in given.items() if k not in panel_keys()})
        # the Chat tab's settings: a wrong one is refused now, not when the tab opens
        chatted = validate(chat_settings or {}, "chat", "chat setting")
        # a model that already holds the adapter opens on that adapter's settings: Re-inject then changes it
        held = _adapter_settings(require_module(model), name)
        column.update(held)
        values = {name: column.get(name, SETTINGS[name].default) for name in panel_keys()}
        self.model = require_module(model)
        self.variable = variable
        self.namespace = namespace
        self.on_change = on_change
        self.adapter_name = name
        self.tokenizer = tokenizer
        self.chat_settings = chatted
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
            _css=front_end_source()[1] + "\n" + panel_stylesheet(),
            layout=w.Layout(flex="1 1 430px", min_width="0", max_width="100%"),
        )  # fmt: skip
        self.tree.add_class("jl-panel-tree")
        # One control per setting the panel shows, built from its declaration (the tree holds targets/layers).
        self.controls: dict[str, w.Widget] = {
            name: _control(SETTINGS[name], values[name])
            for name in panel_keys()
            if name not in ("targets", "layers")
        }
        self.controls["targets"], self.controls["layers"] = self.tree, self.tree
        self.r, self.dropout, self.variant, self.init, self.quant = (
            self.controls[k] for k in ("r", "dropout", "variant", "init", "quant")
        )
        alpha = values["alpha"]
        self.alpha = self.controls["alpha"]
        self.alpha.value = alpha if alpha is not None else 2 * self.r.value
        self.alpha.disabled = alpha is None
        self.pow2 = w.Checkbox(value=False, description="powers of 2", indent=False, layout=_fixed())
        self.alpha_lock = w.Checkbox(
            value=alpha is None, description="alpha = 2r", indent=False, layout=_fixed()
        )
        self.summary = w.HTML(layout=w.Layout(min_height="120px"))
        self.summary.add_class("jl-message")
        self.error = w.HTML()
        self.error.add_class("jl-message")

        # The training form: one control per training setting, in the schema's sections.
        self.form: dict[str, w.Widget] = {}
        self.form_errors: dict[str, str] = {}  # setting -> the schema's message for what its box holds
        self._form_values: dict[str, Any] = {}  # setting -> its last valid value
        self._form_messages: dict[str, w.HTML] = {}
        self._form_items: dict[str, w.VBox] = {}
        basic, advanced, titles = None, [], []
        for section, title, is_advanced, names in form_sections():
            grid = self._form_grid(section, names, trained)
            if is_advanced:
                advanced.append(grid)
                titles.append(title)
            else:
                basic = w.VBox([w.HTML(f"<div class='jl-section-title'>{html.escape(title)}</div>"), grid])
        self.advanced = w.Accordion(children=advanced, titles=tuple(titles), selected_index=None)
        self.advanced.add_class("jl-advanced")
        self.batch, self.seq, self.ckpt, self.optim = (
            self.form[k] for k in ("batch", "seq", "ckpt", "optim")
        )
        self.steps, self.data = self.form["steps"], self.form["data"]

        self.inject_button = w.Button(description="Inject", button_style="primary", icon="plus")
        self.train_button = w.Button(description="Train", icon="play")
        self.merge_button = w.Button(description="Merge", icon="compress")
        self.save_button = w.Button(description="Save", icon="save")
        self.unload_button = w.Button(description="Unload", icon="trash")
        self.code_button = w.ToggleButton(description="Show as code", icon="code")
        self.save_path = w.Text(value="adapters/run1", description="path", style={"description_width": "35px"},
                                layout=_grow("200px"))  # fmt: skip
        self.output_line = w.HTML(layout=w.Layout(flex="1 1 300px", min_width="0"))
        self.output_line.add_class("jl-message")
        self.code_python = w.Textarea(layout=w.Layout(width="auto", height="120px"))
        self.code_inject = w.Textarea(layout=w.Layout(width="auto", height="120px"))
        self.code_train = w.Textarea(layout=w.Layout(width="auto", height="170px"))
        self.code = w.VBox(
            [w.HTML("<b>Python</b>"), self.code_python, w.HTML("<b>the same as %%lora cells</b>"), self.code_inject,
             self.code_train],
            layout=w.Layout(width="100%", display="none"),
        )  # fmt: skip
        self.progress_area = w.VBox()

        for widget in self.controls.values():
            if widget is not self.tree:
                widget.observe(self._on_control, names="value")
        for key, widget in self.form.items():
            widget.observe(lambda change, key=key: self._on_form(key), names="value")
        self.pow2.observe(self._on_pow2, names="value")
        self.alpha_lock.observe(self._on_lock, names="value")
        self.tree.observe(self._on_control, names=["targets", "layers"])
        self.code_button.observe(self._on_code, names="value")
        self.inject_button.on_click(self._guard(self._inject))
        self.train_button.on_click(self._guard(self._train))
        self.merge_button.on_click(self._guard(self._merge))
        self.save_button.on_click(self._guard(self._save))
        self.unload_button.on_click(self._guard(self._unload))

        side = w.VBox([
            _row([self.r, self.pow2]), _row([self.alpha, self.alpha_lock]), _row([self.dropout]),
            _row([self.variant, self.init]), _row([self.quant]), self.summary,
        ], layout=w.Layout(flex="1 1 360px", min_width="0", max_width="620px"))  # fmt: skip
        top = w.HBox([self.tree, side], layout=w.Layout(align_items="flex-start", width="100%"))
        top.add_class("jl-wrap")
        top.add_class("jl-panel-top")
        actions = _row([self.inject_button, self.merge_button, self.unload_button, self.save_path,
                        self.save_button, self.code_button])  # fmt: skip
        training = w.VBox([*([basic] if basic else []), self.advanced, _row([self.train_button, self.output_line])],
                          layout=w.Layout(width="100%"))  # fmt: skip
        training.add_class("jl-training")
        self.adapter_tab = w.VBox([top, self.error, actions, training, self.code, self.progress_area],
                                  layout=w.Layout(width="100%"))  # fmt: skip
        self.adapter_tab.add_class("jl-tab-adapter")

        # The Data tab: the preview of the data the form names, with the form's settings, when asked for.
        self.preview_button = w.Button(description="Preview", button_style="primary", icon="eye",
                                       tooltip="Preview the data the training form names, with its settings")  # fmt: skip
        self.preview_button.add_class("jl-preview-button")
        self.preview_n = w.BoundedIntText(value=_PREVIEW_N, min=0, max=100, description="records",
                                          tooltip="how many of the first records to show",
                                          style={"description_width": "55px"}, layout=w.Layout(width="130px"))  # fmt: skip
        self.preview_message = w.HTML()
        self.preview_message.add_class("jl-message")
        self.preview_output = w.Output()
        self.preview_output.add_class("jl-preview")
        self.last_preview: Any = None  # the DataPreview shown
        self._previewed: tuple | None = None  # what it was made from (to say when the form changed since)
        self.preview_button.on_click(self._guard(self._preview, self.preview_message))
        hint = w.HTML("<div class='jl-preview-hint' style='color:#666'>the data the training form (Adapter tab) "
                      "names, as training would prepare it with the form's settings</div>",
                      layout=w.Layout(flex="1 1 240px", min_width="0"))  # fmt: skip
        hint.add_class("jl-message")
        self.data_tab = w.VBox([_row([self.preview_button, self.preview_n, hint]), self.preview_message,
                                self.preview_output], layout=w.Layout(width="100%"))  # fmt: skip
        self.data_tab.add_class("jl-tab-data")

        # The Chat tab: the chat widget, built when the tab is first opened.
        self.chat: Any = None  # the ChatWidget (or ClassifierWidget) once built
        # (tokenizer, processor) it was built with (None: the one beside the model)
        self._chat_made_with: Any = None
        self.chat_message = w.HTML()
        self.chat_message.add_class("jl-message")
        self.chat_tab = w.VBox([self.chat_message], layout=w.Layout(width="100%"))
        self.chat_tab.add_class("jl-tab-chat")

        self.tabs = w.Tab(children=[self.adapter_tab, self.data_tab, self.chat_tab], titles=TABS)
        self.tabs.add_class("jl-tabs")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.box = w.VBox([self.tabs], layout=w.Layout(max_width="100%"))
        self.box.add_class("jl-panel")
        self.plan = None
        self.estimate = None
        self.update()
        if held and self.plan is not None:  # opened on the adapter the model holds
            self._held = self._plan_key(self.plan)
            self.summary.value = self._summary_html(self.plan, self.estimate)
        self._refresh_output()
        _follow_after_cells(self)

    def _form_grid(self, section: str, names: tuple[str, ...], given: Mapping[str, Any]) -> w.GridBox:
        items = []
        for name in names:
            setting = SETTINGS[name]
            value = given.get(name, setting.default)
            if setting.kind == "object" and value is not None and not isinstance(value, str):
                raise UsageError(
                    f"`{name}` in the panel names a notebook variable (or a path), e.g. {name}={setting.example!r}; "
                    f"got a {type(value).__name__}."
                )
            if setting.kind != "object":
                with warnings.catch_warnings():  # an unusual value's warning is the field's note (below)
                    warnings.simplefilter("ignore")
                    value = validate_one(name, value)
            control = _form_control(setting, value)
            message = w.HTML(layout=w.Layout(display="none"))
            message.add_class("jl-message")
            item = w.VBox([control, message], layout=w.Layout(min_width="0"))
            item.add_class("jl-form-item")
            item.add_class(f"jl-form-{name}")
            self.form[name], self._form_messages[name], self._form_items[name] = control, message, item
            self._check_field(name)
            items.append(item)
        grid = w.GridBox(items, layout=w.Layout(grid_template_columns=_FORM_COLUMNS, grid_gap="2px 16px",
                                                width="100%"))  # fmt: skip
        grid.add_class("jl-form-grid")
        grid.add_class(f"jl-form-{section}")
        return grid

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
        """What the memory figure assumes beyond the adapter: the training form's batch, seq, ckpt, optim (their
        last valid values) and the base (4/8-bit) beside the tree."""
        out = {}
        for name in keys("estimate"):
            if name in self._form_values:
                out[name] = self._form_values[name]
            elif name in self.controls and name not in keys("inject"):
                out[name] = self.controls[name].value
        return out

    def training_settings(self) -> dict[str, Any]:
        """The training settings the form holds that differ from their defaults — what Train passes (the notebook
        inputs as the names typed). A UsageError names the first field whose value is wrong."""
        if self.form_errors:
            message = next(iter(self.form_errors.values()))
            more = f" (and {len(self.form_errors) - 1} more marked)" if len(self.form_errors) > 1 else ""
            raise UsageError(f"Fix the training settings first: {message}{more}")
        return self._changed_training_settings()

    def _changed_training_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self._form_values.items() if v is not None and v != SETTINGS[k].default}

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
            self._mark_stale()
            self.last_update_ms = 1000 * (time.perf_counter() - start)
            return
        self._stale = False
        self.plan, self.estimate = plan, estimate
        with self.tree.hold_sync():
            self.tree.error = ""
            self.tree.selected = list(plan.targets)
        self.summary.value = self._summary_html(plan, estimate)
        if any(
            name in self.form_errors for name in keys("estimate")
        ):  # figures of the last valid batch, seq...
            self._mark_stale()
        self._refresh_code()
        self._refresh_buttons()
        self.last_update_ms = 1000 * (time.perf_counter() - start)

    def _mark_stale(self) -> None:
        if not self._stale and self.plan is not None:  # the numbers shown are no longer the settings'
            self._stale = True
            self.summary.value = (
                f"<div class='jl-stale' style='opacity:.45'>{self.summary.value}</div>"
                "<div class='jl-stale-note' style='color:#666;font-size:90%'>these figures are for the last "
                "valid settings</div>"
            )

    # --------------------------------------------------------------------------------------- the training form

    def _read_field(self, name: str) -> tuple[Any, str]:
        """(value, note) of a form field, checked by the schema (a UsageError says what is wrong); the note is
        the schema's warning about an unusual value (lr outside the usual range)."""
        from ..magics.parse import read_value

        setting, control = SETTINGS[name], self.form[name]
        value = control.value
        if isinstance(control, w.Text):
            text = value.strip()
            if not text:
                return setting.default, ""
            value = text if setting.kind == "text" else read_value(text, name)
        if setting.kind == "object":
            self._resolve(name, value)  # a variable that does not exist is marked at once
            return value, ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = validate_one(name, value)
        return value, " ".join(str(c.message) for c in caught)

    def _check_field(self, name: str) -> None:
        message, item = self._form_messages[name], self._form_items[name]
        try:
            value, note = self._read_field(name)
        except UsageError as exc:
            self.form_errors[name] = str(exc)
            item.add_class("jl-invalid")
            message.value = f"<div class='jl-form-message jl-form-error'>{html.escape(str(exc))}</div>"
            message.layout.display = ""
            return
        self.form_errors.pop(name, None)
        self._form_values[name] = value
        item.remove_class("jl-invalid")
        message.value = f"<div class='jl-form-message jl-form-note'>{html.escape(note)}</div>" if note else ""
        message.layout.display = "" if note else "none"

    def _on_form(self, name: str) -> None:
        self._check_field(name)
        self._mark_preview()
        if name in keys("estimate"):
            self.update()  # the memory figure follows batch, seq, ckpt, optim
        else:
            self._refresh_code()
        if name == "output_dir":
            self._refresh_output()

    def _resolve(self, name: str, value: Any) -> Any:
        """A notebook input as the magic reads it: a variable name gives the object it holds; anything else (a
        path, a literal) is itself."""
        if not (isinstance(value, str) and value.isidentifier()) or self.namespace is None:
            return value
        if value not in self.namespace:
            raise UsageError(
                f"`{name}`: no variable `{value}` in the notebook ({SETTINGS[name].help})."
                f"{did_you_mean(value, [k for k in self.namespace if not k.startswith('_')])}"
            )
        return self.namespace[value]

    def _recheck_inputs(self) -> None:
        """The notebook's variables changed (a cell ran): check the fields that name one again."""
        for name in self.form:
            if SETTINGS[name].kind == "object":
                self._check_field(name)

    # --------------------------------------------------------------------------------------- code

    def as_code(self) -> str:
        """The Python calls that inject and train as the panel shows (only the values that differ from the
        defaults); ``inject_cell`` / ``train_cell`` are the same as ``%%lora`` cells."""
        inject = self._changed_inject_settings()
        args = [f"{k}={v!r}" for k, v in inject.items()]
        if self.adapter_name != "default":
            args.append(f"name={self.adapter_name!r}")
        var = self.variable
        train = self._changed_training_settings()
        data = train.pop("data", None)
        extra = {k: _python_value(SETTINGS[k], v) for k, v in train.items()}
        if "tokenizer" not in extra and self.tokenizer is None and self._tokenizer_name():
            extra = {"tokenizer": self._tokenizer_name(), **extra}  # the one the panel finds, by name
        data_text = _python_value(SETTINGS["data"], data) if data is not None else "data"
        lines = [
            "import jupyter_lora as jl",
            "",
            f"{var} = jl.inject({', '.join([var, *args])})",
            f"run = jl.train({', '.join([var, data_text, *(f'{k}={v}' for k, v in extra.items())])})",
        ]
        if data is None:
            lines[-1] += "  # data: the training texts or records (the panel's data field is empty)"
        return "\n".join(lines)

    def inject_cell(self) -> str:
        """The ``%%lora MODEL`` cell that injects what the panel shows (only the values that differ from the
        defaults)."""
        from ..magics.parse import inject_cell

        return inject_cell(self.variable, self._changed_inject_settings(), self.adapter_name)

    def train_cell(self) -> str:
        """The ``%%lora train MODEL`` cell that trains as the form says (only the values that differ from the
        defaults)."""
        from ..magics.parse import train_cell

        train = self._changed_training_settings()
        if "data" not in train:  # the cell needs the key; the field is empty
            return train_cell(self.variable, {"data": None, **train}).replace(
                "data: null", "data: null  # the variable holding the training data", 1
            )
        return train_cell(self.variable, {"data": train.pop("data"), **train})

    def _changed_inject_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings().items() if v is not None and v != SETTINGS[k].default}

    def _refresh_code(self) -> None:
        if self.code_button.value:
            self.code_python.value = self.as_code()
            self.code_inject.value = self.inject_cell()
            self.code_train.value = self.train_cell()

    # --------------------------------------------------------------------------------------- rendering

    def _summary_html(self, plan, estimate) -> str:
        parts = memory_parts(estimate)
        total = estimate.total_bytes
        scale = max(total, estimate.gpu_capacity_bytes or 0) or 1
        bar = "".join(
            f"<div title='{label}: {fmt_bytes(value)}' style='width:{100 * value / scale:.2f}%;"
            f"background:{_PART_COLORS[key]};height:14px'></div>"
            for key, label, value in parts if value
        )  # fmt: skip
        legend = " ".join(
            f"<span class='jl-legend-{key}' style='white-space:nowrap'><span style='display:inline-block;width:9px;"
            f"height:9px;background:{_PART_COLORS[key]}'></span> {label} {fmt_bytes(value)}</span>"
            for key, label, value in parts if value
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
            f"<span class='jl-adapter-bytes'>{adapter_size(plan)}</span> on disk · {state}</div>"
            f"<div style='margin-top:4px'>training ≈ <b class='jl-memory'>{fmt_bytes(total)}</b>{capacity}</div>"
            f"<div class='jl-membar' style='display:flex;width:100%;background:#eee;margin:3px 0'>{bar}</div>"
            f"<div class='jl-legend' style='font-size:90%'>{legend}</div>"
            f"<div style='font-size:90%;color:#666'>{fmt_count(plan.adapter_params)} LoRA params, "
            f"r={plan.spec.r}, alpha={plan.spec.lora_alpha:g}</div></div>"
        )

    def output_dir(self) -> Path | None:
        """Where Train writes (the running or last run's folder once there is one); None when the panel cannot
        know it yet (no output_dir set: the folder is named by the start time)."""
        if self.run is not None and self.run.running:
            return self.run.output_dir
        given = self._form_values.get("output_dir")
        return Path(given) if given else None

    def _refresh_output(self) -> None:
        from jupyter_lora.core.train import default_output_dir

        def where(path: Path) -> str:
            shown = path if path.is_absolute() else Path.cwd() / path
            return f"<code>{html.escape(str(shown))}</code>"

        if self.run is not None and self.run.running:
            text = f"training: checkpoints go to {where(self.run.output_dir)}"
        else:
            given = self._form_values.get("output_dir")
            if given:
                text = f"Train writes its checkpoints to {where(Path(given))}"
            else:
                text = (f"Train writes its checkpoints to {where(default_output_dir(self.model, '<start time>'))}"
                        " (set output_dir to choose)")  # fmt: skip
            if self.run is not None:
                text += f"; the last run wrote to {where(self.run.output_dir)}"
        self.output_line.value = f"<div class='jl-output-dir'>{text}</div>"

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

    def _show_error(self, message: str, area: w.HTML | None = None) -> None:
        shown = f"<div class='jl-panel-error' style='color:#c62828'>{html.escape(message)}</div>"
        (area or self.error).value = shown

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
        self._refresh_code()

    def _guard(self, action: Callable[[], None], area: w.HTML | None = None) -> Callable[[Any], None]:
        """Button callbacks: errors appear in the panel (in ``area``, default the Adapter tab's message line), in
        words, never as a lost exception or a traceback."""
        area = area or self.error

        def handler(_button=None) -> None:
            area.value = ""
            try:
                self.follow()
                if self.model_gone:  # the variable no longer holds a model: nothing to act on
                    self._show_gone(area)
                    return
                action()
            except UsageError as exc:
                self._show_error(str(exc), area)
            except Exception as exc:
                self._show_error(f"{type(exc).__name__}: {exc}", area)
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
        self._chat_follows()
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

    def _show_gone(self, area: w.HTML | None = None) -> None:
        self._show_error(
            f"`{self.variable}` no longer holds a model: the panel is off. Open a new one with %lora panel.",
            area,
        )

    def _after_cell(self, *_: Any) -> None:
        with contextlib.suppress(Exception):  # never break the user's cell
            self.follow()
            self._recheck_inputs()
            self._refresh_output()

    def _rebind(self, model: Any) -> None:
        self.model = model
        if self.namespace is not None:
            self.namespace[self.variable] = model
        if self.on_change is not None:
            self.on_change(model)
        self.update()
        self._chat_follows()

    # --------------------------------------------------------------------------------------- actions

    def inject(self) -> None:
        """Inject (or re-inject) the adapter the controls describe."""
        self._guard(self._inject)()

    def train(self) -> None:
        """Train the adapter the model holds with the form's settings (what the Train button does)."""
        self._guard(self._train)()

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
        return (plan.spec, tuple(plan.target_modules), tuple(plan.target_parameters))

    def _merge(self) -> None:
        self._rebind(self._jl.merge(self.model))

    def _unload(self) -> None:
        self._rebind(self._jl.unload(self.model))

    def _save(self) -> None:
        path = self._jl.save(self.model, self.save_path.value)
        self.error.value = (
            f"<div class='jl-panel-note' style='color:#2e7d32'>saved to {html.escape(str(path))}</div>"
        )

    def _form_inputs(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """What the form says to train on: (the data, the notebook inputs it names — resolved, and the tokenizer
        found when it names none —, the other settings that differ from their defaults). Train and Preview both
        use it. A UsageError names a wrong field or the missing data."""
        self._recheck_inputs()
        settings = self.training_settings()
        data = settings.pop("data", None)
        if data is None:
            raise UsageError(
                "Name the training data in the `data` field of the training form (Adapter tab): a variable holding "
                "texts or records, or a .jsonl/.json/.csv/.txt path."
            )
        inputs = {
            k: self._resolve(k, settings.pop(k)) for k in list(settings) if SETTINGS[k].kind == "object"
        }
        if inputs.get("tokenizer") is None:
            inputs["tokenizer"] = self._default_tokenizer()
        return self._resolve("data", data), inputs, settings

    def _default_tokenizer(self) -> Any:
        """The tokenizer when the form names none: the panel's own, else the one tokenizer in the notebook, else
        None (the functions then take the one saved beside the model)."""
        return self.tokenizer if self.tokenizer is not None else self._find_tokenizer()

    def _train(self) -> None:
        from .progress import progress_observer

        data, inputs, settings = self._form_inputs()
        holder: dict[str, Any] = {}
        observer = progress_observer(stop=lambda: holder["run"].stop(wait=False), mode="widget")
        run = self._jl.train(self.model, data, **inputs, **settings,
                             observers=[observer, self._on_training_event])  # fmt: skip
        holder["run"] = self.run = run
        self.progress_area.children = [getattr(observer, "box", w.HTML(repr(observer)))]
        self._refresh_output()

    def _on_training_event(self, event) -> None:
        if event.kind == "end":
            self._refresh_buttons()
            self._refresh_output()

    # --------------------------------------------------------------------------------------- the Data and Chat tabs

    def preview(self) -> Any:
        """Preview the data the training form names, with the form's settings, in the Data tab (what its Preview
        button does): ``jupyter_lora.preview_data`` with what Train would pass. Returns the ``DataPreview`` shown;
        None when refused (the one-line message is in the tab)."""
        self._guard(self._preview, self.preview_message)()
        return self.last_preview

    def _preview(self) -> None:
        self.preview_output.outputs = ()  # a failed preview leaves no older one that looks current
        self.last_preview = self._previewed = None
        data, inputs, settings = self._form_inputs()
        # the inputs the preview takes (tokenizer, eval_data); trainer_args only tunes the Trainer, not the data
        taken = inspect.signature(self._jl.preview_data).parameters
        inputs = {k: v for k, v in inputs.items() if k in taken}
        shown = self._jl.preview_data(self.model, data, n=int(self.preview_n.value), **inputs, **settings)
        self.last_preview, self._previewed = shown, self._preview_state()
        # an output (not an HTML widget) so that the histogram's script runs and plotly draws it
        self.preview_output.outputs = (
            {
                "output_type": "display_data",
                "data": {"text/html": shown._repr_html_(), "text/plain": repr(shown)},
                "metadata": {},
            },
        )

    def _preview_state(self) -> tuple[dict[str, Any], dict[str, str]]:
        return dict(self._changed_training_settings()), dict(self.form_errors)

    def _mark_preview(self) -> None:
        """Say so when the form changed since the preview shown (it is made again on demand, not on every key)."""
        if self.last_preview is None:
            return
        changed = self._preview_state() != self._previewed
        self.preview_message.value = (
            "<div class='jl-preview-stale' style='color:#8a6d00'>The training form changed since this preview: "
            "Preview shows the data with the new settings.</div>"
            if changed
            else ""
        )

    def _on_tab(self, change: dict) -> None:
        if change["new"] == TABS.index("Chat"):
            self.open_chat()

    def open_chat(self) -> Any:
        """The Chat tab's chat (``jupyter_lora.chat``) for the panel's model, with the tokenizer the form names or
        the one the panel finds: built the first time (what opening the tab does), and again when that tokenizer
        changed since. None when refused (the one-line message is in the tab)."""
        self.chat_message.value = ""
        try:
            self.follow()
            if self.model_gone:
                self._show_gone(self.chat_message)
                return self.chat
            tokenizer, processor = self._chat_inputs()
            made_with = self._chat_made_with
            if self.chat is not None and (
                (made_with is not None and made_with[0] is tokenizer and made_with[1] is processor)
                or getattr(self.chat, "generating", False)
            ):
                self._chat_follows()
                return self.chat
            chat = self._jl.chat(self.model, tokenizer, processor=processor, variable=self.variable
                                 if self.namespace is not None else None, namespace=self.namespace,
                                 **self.chat_settings)  # fmt: skip
        except UsageError as exc:
            self._show_error(str(exc), self.chat_message)
            return self.chat
        except Exception as exc:
            self._show_error(f"{type(exc).__name__}: {exc}", self.chat_message)
            return self.chat
        self.chat, self._chat_made_with = chat, (tokenizer, processor)
        self.chat_tab.children = [self.chat_message, chat.box]
        return chat

    def _chat_inputs(self) -> tuple[Any, Any]:
        """(tokenizer, processor) for the Chat tab. An image or audio model takes the processor the form names, else
        the one processor in the notebook, else its own (found beside it), and a tokenizer only when the form names
        one (a speech processor holds its own); other models take the form's processor only when it names one."""
        from ..core.data.processors import MEDIA_TASKS, is_processor, training_task

        media = training_task(self.model) in MEDIA_TASKS
        if "processor" in self.form:
            self._check_field("processor")
        if "processor" in self.form_errors:
            raise UsageError(self.form_errors["processor"])
        name = self._form_values.get("processor")
        if name is not None:
            processor = self._resolve("processor", name)
        elif media and self.namespace is not None:
            found = [v for k, v in self.namespace.items() if not k.startswith("_") and is_processor(v)]
            processor = found[0] if len(found) == 1 else None
        else:
            processor = None
        if media and self._form_values.get("tokenizer") is None:
            return None, processor
        return self._chat_tokenizer(), processor

    def _chat_tokenizer(self) -> Any:
        """The tokenizer the form names (a wrong name is the field's message), else the panel's default one."""
        if "tokenizer" in self.form:
            self._check_field("tokenizer")
        if "tokenizer" in self.form_errors:
            raise UsageError(self.form_errors["tokenizer"])
        name = self._form_values.get("tokenizer")
        return self._resolve("tokenizer", name) if name is not None else self._default_tokenizer()

    def _chat_follows(self) -> None:
        """Keep the chat on the panel's model (after Inject, Merge, Unload, or a cell that changed the variable)."""
        if self.chat is None or self.chat.conversation.model is self.model:
            return
        try:
            self.chat.use_model(self.model)
        except UsageError as exc:
            self._show_error(str(exc), self.chat_message)
        else:
            self.chat_message.value = ""

    # --------------------------------------------------------------------------------------- notebook inputs

    def _tokenizer_name(self) -> str | None:
        """The one notebook variable holding a tokenizer (None: none, or several)."""
        import sys

        base = sys.modules.get("transformers.tokenization_utils_base")
        if base is None or self.namespace is None:
            return None
        found = [
            k
            for k, v in self.namespace.items()
            if not k.startswith("_") and isinstance(v, base.PreTrainedTokenizerBase)
        ]
        return found[0] if len(found) == 1 else None

    def _find_tokenizer(self) -> Any:
        name = self._tokenizer_name()
        return self.namespace[name] if name is not None and self.namespace is not None else None

    # --------------------------------------------------------------------------------------- display

    def show(self) -> None:
        from IPython.display import display

        display(self.box)

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        trainable = f"{self.plan.trainable_params:,} trainable" if self.plan else "no plan"
        return f"<jupyter_lora.Panel for `{self.variable}`: {trainable}, targets={self.tree.targets!r}>"


def panel(model: Any, tokenizer: Any = None, **options: Any) -> Panel:
    """The LoRA panel for ``model``: its tabs "Adapter" (module tree, rank/alpha/..., live counts and memory,
    Inject/Merge/Save/Unload, the training form and Train), "Data" (the preview of the data the form names) and
    "Chat" (a chat with the model). ``tokenizer``: the one Train, the preview and the chat use when the form names
    none (default: the one tokenizer in ``namespace``, else the one saved beside the model). ``options``: what
    ``Panel`` takes — ``variable``/``namespace`` (follow ``namespace[variable]``), ``name`` (the adapter),
    ``train_settings``, ``chat_settings``, and starting values of the controls (r, alpha, targets, lr, steps, data
    as a variable name, ...)."""
    return Panel(model, tokenizer=tokenizer, **options)
