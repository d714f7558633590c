"""``LoraMagics``: ``%lora`` / ``%%lora``. Each subcommand is parse -> one public API call -> display; no logic of
its own beyond finding variables and putting results back into them.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Bool, Float, Integer, Unicode

from ..core.errors import UsageError, did_you_mean
from . import parse as p

__all__ = ["LoraMagics"]


@magics_class
class LoraMagics(Magics):
    """LoRA fine-tuning of the model in a notebook variable. Settings: ``%config LoraMagics.default_r = 16``."""

    default_r = Integer(16, help="LoRA rank when a %%lora cell gives no `r`.").tag(config=True)
    default_alpha = Float(None, allow_none=True, help="LoRA alpha when none is given (None: 2*r).").tag(
        config=True
    )
    default_dropout = Float(0.0, help="LoRA dropout when none is given.").tag(config=True)
    default_targets = Unicode(
        "", help="Targets when none are given ('' = PEFT's default for the model)."
    ).tag(config=True)
    default_seq = Integer(1024, help="Sequence length for memory estimates.").tag(config=True)
    default_batch = Integer(8, help="Batch size for memory estimates.").tag(config=True)
    default_ckpt = Bool(False, help="Estimate with gradient checkpointing.").tag(config=True)
    default_optim = Unicode("adamw", help="Optimizer for memory estimates.").tag(config=True)
    max_new_tokens = Integer(40, help="Tokens generated per side by %lora compare.").tag(config=True)
    show_estimate = Bool(True, help="Show the memory estimate after %%lora.").tag(config=True)
    progress = Unicode("auto", help="Training progress display: auto | widget | text.").tag(config=True)

    @line_cell_magic
    def lora(self, line: str, cell: str | None = None) -> Any:
        try:
            command = p.parse(line, cell)
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

    def _settings(self, given: dict[str, Any]) -> dict[str, Any]:
        settings = dict(given)
        keys = set(settings)
        if not keys & {"r", "rank", "lora_r"}:
            settings["r"] = self.default_r
        if not keys & {"alpha", "lora_alpha"} and self.default_alpha is not None:
            settings["alpha"] = self.default_alpha
        if not keys & {"dropout", "lora_dropout"}:
            settings["dropout"] = self.default_dropout
        if not keys & {"targets", "target_modules"} and self.default_targets:
            settings["targets"] = self.default_targets
        return settings

    def _estimate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {
            "seq": options.get("seq", self.default_seq),
            "batch": options.get("batch", self.default_batch),
            "ckpt": options.get("ckpt", self.default_ckpt),
            "optim": options.get("optim", self.default_optim),
            **{k: options[k] for k in ("dtype", "quant") if k in options},
        }

    def _do_inject(self, command: p.Inject) -> Any:
        import jupyter_lora as jl
        from jupyter_lora.display import InjectSummary

        model = self._get_model(command.model)
        settings = self._settings(dict(command.settings))
        plan = jl.plan(model, name=command.name, **settings)
        estimate = jl.estimate(model, plan, **self._estimate_options({})) if self.show_estimate else None
        if command.dry_run:
            return InjectSummary(plan, estimate, command.model, dry_run=True)
        adapted = jl.inject(model, plan.spec, name=command.name)
        self._set(command.model, adapted)
        if command.replace:
            others = [n for n in adapted.peft_config if n != command.name]
            for other in others:
                jl.delete(adapted, other)
            if others:
                plan = jl.plan(adapted, plan.spec, name=command.name)
        return InjectSummary(plan, estimate, command.model)

    def _do_status(self, command: p.Status) -> Any:
        import jupyter_lora as jl

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
        import jupyter_lora as jl

        ns = self.shell.user_ns
        source: Any = ns.get(command.source, command.source)
        options = self._estimate_options(dict(command.options))
        settings = dict(command.settings)
        torch_nn = sys.modules.get("torch.nn")
        is_adapted = (
            torch_nn is not None and isinstance(source, torch_nn.Module) and jl.status(source).adapters
        )
        if settings or not is_adapted:
            settings = self._settings(settings)
        return jl.estimate(source, **options, **settings)

    def _do_modelcommand(self, command: p.ModelCommand) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        result = getattr(jl, command.action)(model, **command.options)
        if command.action in ("merge", "unload"):
            self._set(command.model, result)
            return _Note(f"`{command.model}` now holds the {'merged' if command.action == 'merge' else 'base'} "
                         f"model ({type(result).__name__}).")  # fmt: skip
        return jl.status(result)

    def _do_namedcommand(self, command: p.NamedCommand) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        getattr(jl, command.action)(model, command.name)
        return jl.status(model)

    def _do_save(self, command: p.Save) -> Any:
        import jupyter_lora as jl

        path = jl.save(self._get_model(command.model), command.path, merged=command.merged, name=command.name)
        what = "merged model" if command.merged else "adapter"
        return _Note(f"Saved the {what} to {path} ({', '.join(sorted(x.name for x in path.iterdir()))}).")

    def _do_load(self, command: p.Load) -> Any:
        import jupyter_lora as jl

        model = jl.load(self._get_model(command.model), command.path, name=command.name)
        self._set(command.model, model)
        return jl.status(model)

    def _do_compare(self, command: p.Compare) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        tokenizer = self._find_tokenizer(command.tokenizer, model)
        return jl.compare(model, command.prompt, tokenizer=tokenizer,
                          max_new_tokens=command.max_new_tokens or self.max_new_tokens)  # fmt: skip

    # --------------------------------------------------------------------------------------- training

    def _train_inputs(self, settings: dict[str, Any], model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
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
                        f"%lora train: no variable `{value}` for `{key}`.{did_you_mean(value, self.shell.user_ns)}"
                    )
                objects[key] = value
        name = settings.pop("tokenizer", None)
        if name is not None or "data" in objects:
            objects["tokenizer"] = self._find_tokenizer(name, model, required=False)
        return objects, settings

    def _observer(self, run_stop: Any, mode: str | None) -> Any:
        from jupyter_lora.widgets.progress import progress_observer

        observer = progress_observer(stop=run_stop, mode=mode or self.progress)
        observer.show()
        return observer

    def _start(self, start: Any, model: Any, objects: dict, settings: dict, mode: str | None) -> Any:
        holder: dict[str, Any] = {}
        observer = self._observer(lambda: holder["run"].stop(wait=False), mode)
        run = start(model, observers=[observer], background=True, **objects, **settings)
        holder["run"] = run
        return None

    def _do_train(self, command: p.Train) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(dict(command.settings), model)
        mode = settings.pop("progress", None)
        data = objects.pop("data")
        return self._start(lambda m, **kw: jl.train(m, data, **kw), model, objects, settings, mode)

    def _do_resume(self, command: p.Resume) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(dict(command.settings), model)
        mode = settings.pop("progress", None)
        return self._start(
            lambda m, **kw: jl.resume(m, command.checkpoint, **kw), model, objects, settings, mode
        )

    def _do_base(self, command: p.Base) -> Any:
        import jupyter_lora as jl

        model, info = jl.load_base(command.source, command.bits, dtype=command.dtype)
        self._set(command.variable, model)
        return _Note(f"`{command.variable}` = {repr(info)[0].lower()}{repr(info)[1:]}")

    def _do_panelcommand(self, command: p.PanelCommand) -> Any:
        from jupyter_lora.widgets.panel import Panel

        model = self._get_model(command.model)
        settings = {"r": self.default_r, "dropout": self.default_dropout, "seq": self.default_seq,
                    "batch": self.default_batch, "targets": self.default_targets}  # fmt: skip
        if self.default_alpha is not None:
            settings["alpha"] = self.default_alpha
        return Panel(model, variable=command.model, namespace=self.shell.user_ns, **settings)

    def _do_export(self, command: p.Export) -> Any:
        import jupyter_lora as jl

        model = self._get_model(command.model)
        objects, settings = self._train_inputs(dict(command.settings), model)
        settings.pop("progress", None)
        objects.pop("eval_data", None)
        data = objects.pop("data")
        return jl.export(model, command.directory, data, tokenizer=objects.get("tokenizer"), **settings)

    def _do_stop(self, command: p.Stop) -> Any:
        import jupyter_lora as jl

        names = [command.model] if command.model else self._module_names()
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

    def _is_model(self, name: str) -> bool:
        torch_nn = sys.modules.get("torch.nn")
        return torch_nn is not None and isinstance(self.shell.user_ns.get(name), torch_nn.Module)

    def _find_tokenizer(self, name: str | None, model: Any, required: bool = True) -> Any:
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
            "%lora compare: no tokenizer in the notebook. Load one (tok = AutoTokenizer.from_pretrained(...)) or "
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
