"""``LoraMagics``: ``%lora`` / ``%%lora``. Each subcommand is parse -> one public API call -> display; no logic of
its own beyond finding variables and putting results back into them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Any as Any_
from traitlets import Bool, TraitError

from ..core.errors import UsageError, did_you_mean
from ..settings import SETTINGS, Setting, keys, validate_one
from . import parse as p

__all__ = ["LoraMagics"]


class _SettingTrait(Any_):
    """A ``%config LoraMagics`` option that changes one setting's default; values are checked by the schema."""

    def __init__(self, setting: Setting):
        self.setting = setting
        super().__init__(setting.default, help=f"Default `{setting.name}`: {setting.help}.")
        self.allow_none = setting.nullable  # traitlets' Any lets None through unchecked otherwise
        self.info_text = setting.describe()
        self.tag(config=True)

    def validate(self, obj: Any, value: Any) -> Any:
        try:
            return validate_one(self.setting.name, value)
        except UsageError as exc:
            raise TraitError(f"LoraMagics.{self.name}: {exc}") from None


# One option per setting that declares one (default_r, default_seq, default_lr, ..., progress, max_new_tokens).
_SettingDefaults = type(
    "_SettingDefaults", (Magics,), {s.trait: _SettingTrait(s) for s in SETTINGS.values() if s.trait}
)


@magics_class
class LoraMagics(_SettingDefaults):
    """LoRA fine-tuning of the model in a notebook variable. Defaults of every setting:
    ``%config LoraMagics.default_r = 16`` (``%config LoraMagics`` lists them)."""

    show_estimate = Bool(True, help="Show the memory estimate after %%lora.").tag(config=True)

    @line_cell_magic
    def lora(self, line: str, cell: str | None = None) -> Any:
        try:
            command = p.parse(line, cell, models=self._module_names())
            return self._run(command)
        except UsageError as exc:
            raise IPythonUsageError(str(exc)) from None

    # --------------------------------------------------------------------------------------- variables

    def _get(self, name: str, what: str = "MODEL") -> Any:
        ns = self.shell.user_ns
        if name in ns:
            return ns[name]
        modules = self._module_names()
        hint = did_you_mean(name, modules) or (
            f" Model variables here: {', '.join(modules)}."
            if modules
            else " No model variable is defined yet."
        )
        raise UsageError(f"%lora: no variable `{name}` in the notebook ({what}).{hint}")

    def _module_names(self) -> list[str]:
        torch_nn = sys.modules.get("torch.nn")
        if torch_nn is None:
            return []
        return sorted(
            k for k, v in self.shell.user_ns.items()
            if not k.startswith("_") and isinstance(v, torch_nn.Module)
        )  # fmt: skip

    def _get_model(self, name: str) -> Any:
        value = self._get(name)
        torch_nn = sys.modules.get("torch.nn")
        if torch_nn is None or not isinstance(value, torch_nn.Module):
            modules = self._module_names()
            others = f" Model variables here: {', '.join(modules)}." if modules else ""
            raise UsageError(
                f"%lora: `{name}` is of type {type(value).__name__}, not a model (torch.nn.Module).{others}"
            )
        return value

    def _set(self, name: str, value: Any) -> None:
        self.shell.user_ns[name] = value

    # --------------------------------------------------------------------------------------- dispatch

    def _run(self, command: p.Command) -> Any:
        handler = getattr(self, f"_do_{type(command).__name__.lower()}")
        return handler(command)

    def _do_help(self, command: p.Help) -> Any:
        from IPython.display import Pretty

        return Pretty(p.USAGE)

    def _with_defaults(self, scope: str, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` (canonical names) plus every default of ``scope`` changed with ``%config``."""
        changed = {}
        for name in keys(scope):
            setting = SETTINGS[name]
            if setting.trait and name not in given:
                value = getattr(self, setting.trait)
                if value != setting.default:
                    changed[name] = value
        return {**changed, **given}

    def _estimate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """What an estimate assumes (seq, batch, ckpt, optim, ...): as given, else what training would use."""
        merged = self._with_defaults("estimate", options)
        return {k: merged[k] for k in p.ESTIMATE_OPTIONS if k in merged}

    def _do_inject(self, command: p.Inject) -> Any:
        from jupyter_lora.display import InjectSummary

        from .. import api as jl

        model = self._get_model(command.model)
        settings = self._with_defaults("inject", dict(command.settings))
        plan = jl.plan(model, name=command.name, replace=command.replace, **settings)
        estimate = jl.estimate(model, plan, **self._estimate_options({})) if self.show_estimate else None
        if command.dry_run:
            return InjectSummary(plan, estimate, command.model, dry_run=True)
        self._set(command.model, jl.inject(model, plan=plan))
        return InjectSummary(plan, estimate, command.model)

    def _do_status(self, command: p.Status) -> Any:
        from .. import api as jl

        if command.model is not None:
            return jl.status(self._get_model(command.model))
        adapted = [n for n in self._module_names() if jl.status(self.shell.user_ns[n]).adapters]
        if len(adapted) == 1:
            return jl.status(self.shell.user_ns[adapted[0]])
        if not adapted:
            raise UsageError(
                "%lora status: no variable holds an adapted model yet. Name one: %lora status MODEL."
            )
        raise UsageError(
            f"%lora status: several adapted models ({', '.join(adapted)}); name one: %lora status MODEL."
        )

    def _do_estimate(self, command: p.Estimate) -> Any:
        from .. import api as jl

        ns = self.shell.user_ns
        source: Any = ns.get(command.source, command.source)
        options = self._estimate_options(dict(command.options))
        settings = dict(command.settings)
        torch_nn = sys.modules.get("torch.nn")
        is_adapted = (
            torch_nn is not None and isinstance(source, torch_nn.Module) and jl.status(source).adapters
        )
        if settings or not is_adapted:
            settings = self._with_defaults("inject", settings)
        return jl.estimate(source, **options, **settings)

    def _do_modelcommand(self, command: p.ModelCommand) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        result = getattr(jl, command.action)(model, **command.options)
        if command.action in ("merge", "unload"):
            self._set(command.model, result)
            return _Note(f"`{command.model}` now holds the {'merged' if command.action == 'merge' else 'base'} "
                         f"model ({type(result).__name__}).")  # fmt: skip
        return jl.status(result)

    def _do_namedcommand(self, command: p.NamedCommand) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        getattr(jl, command.action)(model, command.name)
        return jl.status(model)

    def _do_save(self, command: p.Save) -> Any:
        from .. import api as jl

        path = jl.save(self._get_model(command.model), command.path, merged=command.merged, name=command.name,
                       overwrite=command.overwrite)  # fmt: skip
        what = "merged model" if command.merged else "adapter"
        return _Note(f"Saved the {what} to {path} ({', '.join(sorted(x.name for x in path.iterdir()))}).")

    def _do_load(self, command: p.Load) -> Any:
        from .. import api as jl

        model = jl.load(
            self._get_model(command.model), command.path, name=command.name, hotswap=command.hotswap
        )
        self._set(command.model, model)
        return jl.status(model)

    def _do_compare(self, command: p.Compare) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        from ..core.data.processors import MEDIA_TASKS, training_task

        if training_task(model) in MEDIA_TASKS:
            # an image or audio model: the prompt names a variable holding the image or clip (else it is a path)
            name = command.prompt
            value = self.shell.user_ns[name] if name.isidentifier() and name in self.shell.user_ns else name
            processor = self._find_processor(command.processor)
            return jl.compare(model, value, processor=processor,
                              max_new_tokens=command.max_new_tokens or self.max_new_tokens)  # fmt: skip
        from ..core.data.processors import is_vision_language

        if command.images or is_vision_language(model):
            # a vision-language model: its processor formats the prompt (and the images, when --image names some)
            processor = self._find_processor(command.processor)
            tokenizer = self._get(command.tokenizer, "--tokenizer") if command.tokenizer else None
            if processor is None and tokenizer is None:
                tokenizer = self._find_tokenizer(None, model)
            images = [self._image(name) for name in command.images] or None
            return jl.compare(model, command.prompt, tokenizer=tokenizer, images=images, processor=processor,
                              max_new_tokens=command.max_new_tokens or self.max_new_tokens)  # fmt: skip
        tokenizer = self._find_tokenizer(command.tokenizer, model)
        return jl.compare(model, command.prompt, tokenizer=tokenizer,
                          max_new_tokens=command.max_new_tokens or self.max_new_tokens)  # fmt: skip

    def _image(self, name: str) -> Any:
        """An image named on a line: the notebook variable holding it, else a path."""
        ns = self.shell.user_ns
        return ns[name] if name.isidentifier() and name in ns else name

    def _do_generate(self, command: p.Generate) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        tokenizer = self._find_tokenizer(command.tokenizer, model, required=False, command="generate")
        return jl.generate(model, list(command.prompts), list(command.adapters) if command.adapters else None,
                           tokenizer=tokenizer,
                           max_new_tokens=command.max_new_tokens or self.max_new_tokens)  # fmt: skip

    def _do_chat(self, command: p.Chat) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        from ..core.data.processors import MEDIA_TASKS, training_task

        if training_task(model) in MEDIA_TASKS:
            # an image or audio model: its processor (named, or the only one in the notebook, else the one saved
            # beside the model) and a tokenizer only when named (a speech processor holds its own)
            processor = self._find_processor(command.processor)
            tokenizer = self._get(command.tokenizer, "--tokenizer") if command.tokenizer else None
        else:
            processor = self._get(command.processor, "--processor") if command.processor else None
            # a tokenizer variable (named, or the only one in the notebook), else the one saved beside the model
            tokenizer = self._find_tokenizer(command.tokenizer, model, required=False)
        settings = self._with_defaults("chat", dict(command.settings))
        return jl.chat(model, tokenizer, processor=processor, variable=command.model, namespace=self.shell.user_ns,
                       **settings)  # fmt: skip

    # --------------------------------------------------------------------------------------- training

    def _train_inputs(
        self, settings: dict[str, Any], model: Any, command: str = "train"
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split a train body into (objects resolved from the notebook, plain settings)."""
        settings = dict(settings)
        objects: dict[str, Any] = {}
        for key in ("data", "eval_data"):
            if key in settings:
                value = settings.pop(key)
                # A variable name gives the object it holds; anything else is a path (or a literal list).
                if isinstance(value, str) and value.isidentifier() and value in self.shell.user_ns:
                    value = self.shell.user_ns[value]
                elif isinstance(value, str) and value.isidentifier():
                    raise UsageError(
                        f"%lora {command}: no variable `{value}` for `{key}`."
                        f"{did_you_mean(value, [k for k in self.shell.user_ns if not k.startswith('_')])}"
                    )
                objects[key] = value
        name = settings.pop("tokenizer", None)
        processor = self._find_processor(settings.pop("processor", None))
        if processor is not None:
            objects["processor"] = processor  # it holds the tokenizer the model needs (if any)
        if name is not None or ("data" in objects and processor is None):
            objects["tokenizer"] = self._find_tokenizer(name, model, required=False)
        return objects, settings

    def _observer(self, run_stop: Any, mode: str | None) -> Any:
        from jupyter_lora.widgets.progress import progress_observer

        return progress_observer(stop=run_stop, mode=validate_one("progress", mode or self.progress))

    def _start(self, start: Any, model: Any, objects: dict, settings: dict, mode: str | None) -> Any:
        holder: dict[str, Any] = {}
        observer = self._observer(lambda: holder["run"].stop(wait=False), mode)
        # shown once the run has started: a refused start shows its error and nothing else (the observer keeps
        # whatever the run reported before it is displayed)
        run = start(model, observers=[observer], background=True, **objects, **settings)
        holder["run"] = run
        observer.show()
        return None

    def _do_train(self, command: p.Train) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(self._with_defaults("train", dict(command.settings)), model)
        mode = settings.pop("progress", None)
        data = objects.pop("data")
        return self._start(lambda m, **kw: jl.train(m, data, **kw), model, objects, settings, mode)

    def _sweep_observers(self, variable: str, mode: str | None, holder: dict[str, Any]) -> list:
        """The leaderboard (widget or text, as ``progress`` says) and the observer that makes ``variable`` hold
        what the sweep kept (a PeftModel or the base) when it ends."""
        from jupyter_lora.widgets.sweep import sweep_observer

        board = sweep_observer(stop=lambda: holder["sweep"].stop(wait=False),
                               mode=validate_one("progress", mode or self.progress),
                               resume_hint=f"`%lora resume {variable}`")  # fmt: skip

        def rebind(event: Any) -> None:
            if event.kind == "sweep_end":
                self._set(variable, holder["sweep"].model)

        return [board, rebind]

    def _show_sweep(self, start: Any, variable: str, mode: str | None) -> Any:
        """Start a sweep with the leaderboard, then show it (a refused start shows its error and nothing else);
        ``jupyter_lora.last_sweep(model)`` is the ``Sweep``."""
        holder: dict[str, Any] = {}
        board, rebind = self._sweep_observers(variable, mode, holder)
        holder["sweep"] = start([board, rebind])
        board.show()
        return None

    def _do_sweepcommand(self, command: p.SweepCommand) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(dict(command.settings), model, "sweep")
        mode = settings.pop("progress", None)
        data = objects.pop("data")
        return self._show_sweep(
            lambda observers: jl.sweep(model, data, command.grid, command.runs, observers=observers,
                                       background=True, **objects, **settings),
            command.model, mode,
        )  # fmt: skip

    def _do_resume(self, command: p.Resume) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        last = jl.last_sweep(model)
        if command.checkpoint is None and last is not None and last.state == "stopped":
            objects, settings = self._train_inputs(dict(command.settings), model)
            return self._show_sweep(
                lambda observers: jl.resume_sweep(model, observers=observers, background=True, **objects),
                command.model, settings.pop("progress", None),
            )  # fmt: skip
        objects, settings = self._train_inputs(dict(command.settings), model)
        mode = settings.pop("progress", None)
        return self._start(
            lambda m, **kw: jl.resume(m, command.checkpoint, **kw), model, objects, settings, mode
        )

    def _do_data(self, command: p.Data) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        settings = self._with_defaults("train", dict(command.settings))
        objects, settings = self._train_inputs(settings, model, "data")
        for key in (
            "progress",
            "trainer_args",
        ):  # how a run shows progress / runs: nothing to do with the data
            settings.pop(key, None)
        data = objects.pop("data")
        return jl.preview_data(model, data, n=command.n, **objects, **settings)

    def _do_base(self, command: p.Base) -> Any:
        from .. import api as jl

        model, info = jl.load_base(command.source, command.bits, dtype=command.dtype)
        self._set(command.variable, model)
        return _Note(f"`{command.variable}` = {repr(info)[0].lower()}{repr(info)[1:]}")

    def _do_panelcommand(self, command: p.PanelCommand) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        shown = [name for name, setting in SETTINGS.items() if setting.panel]
        settings = {k: v for k, v in self._with_defaults("estimate", {}).items() if k in shown}
        trained = self._with_defaults("train", {})
        settings.update({k: v for k, v in trained.items() if k in shown})
        others = {k: v for k, v in trained.items() if k not in shown and k != "progress"}
        return jl.panel(model, variable=command.model, namespace=self.shell.user_ns, train_settings=others,
                        chat_settings=self._with_defaults("chat", {}), **settings)  # fmt: skip

    def _do_export(self, command: p.Export) -> Any:
        from .. import api as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(self._with_defaults("train", dict(command.settings)), model)
        settings.pop("progress", None)
        data = objects.pop("data")
        return jl.export(model, command.directory, data, **objects, **settings)

    def _do_stop(self, command: p.Stop) -> Any:
        from .. import api as jl

        if command.model:
            self._get_model(command.model)  # a clear error for a name that holds no model
        names = [command.model] if command.model else self._module_names()
        from ..core.runs import active_sweep

        sweeps = [
            (n, active_sweep(self.shell.user_ns[n])) for n in names if command.model or self._is_model(n)
        ]
        sweeps = [(n, s) for n, s in sweeps if s is not None]
        if len(sweeps) == 1 or (sweeps and command.model):
            name, sweep = sweeps[
                0
            ]  # a sweep stops as a whole: its current run checkpoints, the rest is not run
            sweep.stop(wait=True)
            return _Note(
                f"Stopped the sweep of `{name}` ({sweep.sweep_dir}); %lora resume {name} continues it."
            )
        runs = [(n, jl.last_run(self.shell.user_ns[n])) for n in names if command.model or self._is_model(n)]
        active = [(n, r) for n, r in runs if r is not None and r.running]
        if not active:
            target = f"`{command.model}`" if command.model else "any model"
            raise UsageError(f"%lora stop: {target} is not training.")
        if len(active) > 1 and command.model is None:
            raise UsageError(
                f"%lora stop: several models are training ({', '.join(n for n, _ in active)}); name one."
            )
        name, run = active[0]
        run.stop(wait=True)
        where = f"; checkpoint {run.checkpoint}" if run.checkpoint else ""
        return _Note(f"Stopped training `{name}` at step {run.step}/{run.total_steps}{where}.")

    def _do_runs(self, command: p.Runs) -> Any:
        from .. import api as jl

        target = command.target
        if target is None:
            return jl.runs(variable=self._code_variable())
        value = self.shell.user_ns.get(target) if target.isidentifier() else None
        if self._is_model(target):
            return jl.runs(value, variable=target)
        if isinstance(value, (str, os.PathLike)):  # a variable holding the directory
            return jl.runs(value, variable=self._code_variable())
        if value is not None:
            raise UsageError(
                f"%lora runs: `{target}` is of type {type(value).__name__}, neither a model nor a directory."
            )
        if target.isidentifier() and not os.path.exists(target):
            modules = self._module_names()
            hint = did_you_mean(target, modules) or (
                f" Model variables here: {', '.join(modules)}." if modules else ""
            )
            raise UsageError(
                f"%lora runs: no model variable and no directory called `{target}`.{hint} Give a model, a run "
                "directory or a directory of runs (e.g. lora_runs)."
            )
        return jl.runs(target, variable=self._code_variable())

    def _code_variable(self) -> str:
        """The model the resume/load code of a listing names: the notebook's one model variable when it is the model
        this session trained, else the placeholder MODEL (a run on disk may belong to any model)."""
        from ..core import runs as run_registry

        modules = self._module_names()
        if len(modules) == 1 and run_registry.last_run(self.shell.user_ns[modules[0]]) is not None:
            return modules[0]
        return "MODEL"

    def _is_model(self, name: str) -> bool:
        torch_nn = sys.modules.get("torch.nn")
        return torch_nn is not None and isinstance(self.shell.user_ns.get(name), torch_nn.Module)

    def _find_processor(self, name: str | None) -> Any:
        """The processor variable named (``processor: VAR``), else the only processor in the notebook, else None
        (training then finds the model's own)."""
        if name is not None:
            return self._get(name, "processor")
        if "transformers" not in sys.modules:
            return None
        from ..core.data.processors import is_processor

        found = [k for k, v in self.shell.user_ns.items() if not k.startswith("_") and is_processor(v)]
        if len(found) > 1:
            raise UsageError(
                f"%lora: several processors ({', '.join(sorted(found))}); pick one with --processor VAR (in a cell body: processor: VAR)."
            )
        return self.shell.user_ns[found[0]] if found else None

    def _find_tokenizer(
        self, name: str | None, model: Any, required: bool = True, command: str = "compare"
    ) -> Any:
        if name is not None:
            return self._get(name, "--tokenizer")
        base = sys.modules.get("transformers.tokenization_utils_base")
        if base is not None:
            found = [k for k, v in self.shell.user_ns.items()
                     if not k.startswith("_") and isinstance(v, base.PreTrainedTokenizerBase)]  # fmt: skip
            if len(found) == 1:
                return self.shell.user_ns[found[0]]
            if len(found) > 1:
                raise UsageError(f"%lora: several tokenizers ({', '.join(sorted(found))}); pick one with "
                                 "--tokenizer VAR (or tokenizer: VAR).")  # fmt: skip
        if not required:
            return None
        raise UsageError(
            f"%lora {command}: no tokenizer in the notebook. Load one (tok = AutoTokenizer.from_pretrained(...)) or "
            "pass --tokenizer VAR."
        )


class _Note:
    """A one-line confirmation, shown as text in both front ends."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        import html

        return f"<div class='jl-note'>{html.escape(self.text)}</div>"


LoraMagics.lora.__doc__ = "LoRA fine-tuning of the model in a notebook variable.\n\n" + p.USAGE
