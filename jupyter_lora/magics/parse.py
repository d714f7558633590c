"""The ``%lora`` / ``%%lora`` grammar: (line, cell) -> a frozen command object. Pure: no side effects, no IPython,
no torch — tested alone with tables of inputs.

    %%lora MODEL [--name NAME] [--dry-run] [--replace]      YAML body: r, alpha, dropout, targets, ...
    %lora SUBCOMMAND ARGS...                                 see USAGE
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UsageError, did_you_mean
from ..settings import SETTINGS, aliases, canonical, keys, name_of, settings_help

__all__ = [
    "ESTIMATE_OPTIONS",
    "SUBCOMMANDS",
    "USAGE",
    "Base",
    "Chat",
    "Command",
    "Compare",
    "Data",
    "Estimate",
    "Export",
    "Generate",
    "Help",
    "Inject",
    "Load",
    "ModelCommand",
    "NamedCommand",
    "PanelCommand",
    "Resume",
    "Runs",
    "Save",
    "Status",
    "Stop",
    "SweepCommand",
    "Train",
    "inject_cell",
    "parse",
    "read_value",
    "train_cell",
    "write_value",
]

# Where each kind of setting is written.
_CELLS = {
    "inject": "a `%%lora MODEL` cell",
    "train": "`%%lora train`",
    "estimate": "`%lora estimate`",
    "chat": "`%lora chat`",
    "sweep": "`%%lora sweep`",
}
# What an estimate assumes beyond the adapter (seq, batch, ckpt, optim, dtype, quant): its command-line options.
ESTIMATE_OPTIONS = tuple(k for k in keys("estimate") if k not in keys("inject"))
_OPTIM = SETTINGS["optim"].choices
_DTYPES = SETTINGS["dtype"].choices

USAGE = f"""\
%%lora MODEL [--name NAME] [--dry-run] [--replace]
    Inject (or re-inject) a LoRA adapter into the model held in variable MODEL. Cell body (YAML):
{settings_help("inject")}
    Re-running the cell replaces the adapter of that name. --dry-run shows the plan without touching the model;
    --replace also drops every other adapter first. The summary estimates GPU memory for training with the
    training defaults (batch, seq, ckpt, optim below; change them with %config LoraMagics.default_seq = 1024).

%lora status [MODEL]                         adapters, active, merged, sizes
%lora estimate MODEL [--seq N] [--batch N] [--ckpt|--no-ckpt] [--optim {"|".join(_OPTIM)}]
                     [--dtype {"|".join(_DTYPES)}] [--4bit|--8bit] [--audio-seconds S]
                                             GPU memory for training; MODEL: a model or config variable, or a path/model id
    Optional body (YAML): the %%lora settings above, and
{settings_help(ESTIMATE_OPTIONS)}
%lora merge MODEL [--dequantize]             fold the adapter into the weights; MODEL becomes the plain model
                                             (--dequantize: a 4/8-bit base is dequantised to bf16 first)
%lora base VAR MODEL_ID_OR_PATH [--4bit|--8bit] [--dtype bf16]
                                             load a base model into VAR (4-bit: NF4 + double quant, bf16 compute)
%lora unload MODEL                           remove all adapters; MODEL becomes the base model
%lora enable MODEL | disable MODEL           switch the adapters on/off
%lora use MODEL NAME                         make adapter NAME active
%lora delete MODEL NAME                      remove adapter NAME
%lora save MODEL PATH [--merged] [--name NAME] [--overwrite]
%lora load MODEL PATH_OR_HUB_ID [--name NAME] [--hotswap]
                                             MODEL becomes the adapted model; --hotswap copies the weights into
                                             adapter NAME's place (same targets and ranks; no recompiling)
%lora compare MODEL "prompt" [--tokenizer VAR] [--max-new-tokens N] [--image VAR ...] [--processor VAR]
                                             base vs adapter output side by side; an image or audio model takes a
                                             variable holding one image or clip: MODEL VAR [--processor VAR]; a
                                             vision-language model sees the images named by --image (vars or paths)
%lora generate MODEL [--adapters a,b,base] [--tokenizer VAR] [--max-new-tokens N] "prompt" ["prompt" ...]
                                             every prompt through every adapter (base: none) in one mixed batch,
                                             greedy; a table of prompts × adapters (%%lora generate: a prompt a line)
%lora chat MODEL [--tokenizer VAR] [--processor VAR] [setting=value ...]
                                             chat with the model: streamed replies with the adapter on, off or side by
                                             side, a Stop button; class probabilities for a classifier (an image or
                                             audio model: upload a file or type its path), transcripts for speech
                                             recognition. Settings (on the line as setting=value, or as a %%lora chat
                                             body):
{settings_help("chat")}
%%lora train MODEL                           train in the background with a live progress widget; body (YAML):
{settings_help("train")}
%lora data MODEL DATA [--n N] [setting=value ...]
                                             what training would see: the first N (3) records as the model sees
                                             them (masked tokens grey, the cut at seq marked), token lengths,
                                             truncation, packing, the eval split, dropped records. DATA: a variable
                                             or a .jsonl/.json/.csv/.txt path; settings as for %%lora train (in
                                             %%lora data MODEL DATA, a YAML body; a %%lora train body works as it is)
%%lora sweep MODEL                           runs compared in the background; body (YAML): data: VAR, grid: {{r: [4, 8],
                                             method: [lora, full]}} and/or runs: [{{r: 4}}, {{method: head}}], keep:
                                             best|none|all, and any setting above shared by every run, plus
{settings_help("sweep")}
%lora stop [MODEL]                           finish the current step, checkpoint, free memory
%lora resume MODEL [CHECKPOINT] [k=v ...]    continue from the last (or given) checkpoint; k=v: settings to change
                                             (e.g. steps=60 to extend a finished run)
%lora runs [MODEL|DIR]                       the runs and checkpoints on disk (step, losses, time, size) with the
                                             code that resumes from or loads each; MODEL: where its runs went,
                                             DIR: that directory, nothing: lora_runs/ and this session's runs
%lora panel MODEL                            interactive panel: module tree, rank/alpha sliders, live counts and
                                             memory, inject / train / merge / save / unload buttons
%%lora export MODEL DIR                      write a standalone job (a plain Trainer train.py, adapter, tokenized data,
                                             accelerate configs) for accelerate launch; body as for %%lora train
%lora help                                   this text
Every subcommand is also a Python function: jupyter_lora.inject, .status, .estimate, .merge, ...
Defaults: %config LoraMagics.default_<setting> = value (e.g. default_r, default_seq, default_lr); %config LoraMagics
lists them.
"""

SUBCOMMANDS = (
    "status", "estimate", "merge", "unload", "enable", "disable", "use", "delete", "save", "load", "compare", "help",
    "train", "stop", "resume", "runs", "panel", "base", "export", "data", "chat", "generate", "sweep",
)  # fmt: skip


@dataclass(frozen=True)
class Command:
    """Base of every parsed command."""


@dataclass(frozen=True)
class ModelCommand(Command):
    """A subcommand that acts on the model in one variable (merge, unload, enable, disable)."""

    action: str
    model: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Base(Command):
    """``%lora base VAR SOURCE [--4bit|--8bit] [--dtype bf16]``: load a (QLoRA-ready) base model into VAR."""

    variable: str
    source: str
    bits: int | None = None
    dtype: str = "bf16"


@dataclass(frozen=True)
class NamedCommand(Command):
    """``use`` / ``delete``: a model variable and an adapter name."""

    action: str
    model: str
    name: str


@dataclass(frozen=True)
class Inject(Command):
    model: str
    name: str = "default"
    dry_run: bool = False
    replace: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Status(Command):
    model: str | None = None


@dataclass(frozen=True)
class Estimate(Command):
    source: str
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Save(Command):
    model: str
    path: str
    merged: bool = False
    name: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class Load(Command):
    model: str
    path: str
    name: str = "default"
    hotswap: bool = False


@dataclass(frozen=True)
class Compare(Command):
    model: str
    prompt: str
    tokenizer: str | None = None
    max_new_tokens: int | None = None
    processor: str | None = None
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generate(Command):
    """``%lora generate MODEL [--adapters a,b,base] [--tokenizer VAR] [--max-new-tokens N] "prompt" ...`` (or
    ``%%lora generate MODEL`` with a prompt a line): every prompt through every adapter in one batch."""

    model: str
    prompts: tuple[str, ...]
    adapters: tuple[str, ...] | None = None
    tokenizer: str | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Chat(Command):
    """``%lora chat MODEL [--tokenizer VAR] [--processor VAR] [setting=value ...]`` (or a ``%%lora chat MODEL``
    YAML body)."""

    model: str
    tokenizer: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    processor: str | None = None


@dataclass(frozen=True)
class Train(Command):
    """``%%lora train MODEL`` with a YAML body: data (a variable or a path), tokenizer, settings."""

    model: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Data(Command):
    """``%lora data MODEL DATA [--n N] [key=value ...]`` (or ``%%lora data MODEL [DATA]`` with the training body):
    the data preview. ``settings`` hold ``data`` and the training settings, as a ``Train`` command's do."""

    model: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    n: int = 3


@dataclass(frozen=True)
class PanelCommand(Command):
    """``%lora panel MODEL``: the interactive panel bound to that variable."""

    model: str


@dataclass(frozen=True)
class Export(Command):
    """``%%lora export MODEL DIR`` with the training body: a standalone job for ``accelerate launch``."""

    model: str
    directory: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop(Command):
    model: str | None = None


@dataclass(frozen=True)
class Resume(Command):
    model: str
    checkpoint: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Runs(Command):
    """``%lora runs [MODEL|DIR]``: a model variable or a directory (told apart where the namespace is known)."""

    target: str | None = None


@dataclass(frozen=True)
class SweepCommand(Command):
    """``%%lora sweep MODEL`` with a YAML body: data, grid and/or runs, keep, shared settings."""

    model: str
    grid: Any = None
    runs: Any = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Help(Command):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError with the subcommand's usage instead of printing and exiting."""

    def error(self, message: str):  # type: ignore[override]
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise UsageError(f"%lora {self.prog}: {message}. Usage: %lora {usage}")

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise UsageError(message or f"%lora {self.prog}: invalid arguments")


def _parser(prog: str) -> _Parser:
    return _Parser(prog=prog, add_help=False, allow_abbrev=False)


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError as exc:
        raise UsageError(
            f"%lora: cannot split the line ({exc}); close the quotes around the prompt."
        ) from None


def _yaml(cell: str | None, scope: str) -> dict[str, Any]:
    """Parse a YAML mapping body of the settings of ``scope``; unknown keys get a did-you-mean, syntax errors
    their line number."""
    if cell is None or not cell.strip():
        return {}
    import yaml

    try:
        data = yaml.load(cell, Loader=yaml_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" on line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(
            f"%%lora: the cell body is not valid YAML{where}: {problem}. Write one `key: value` per line."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"%%lora: the cell body must be `key: value` lines (a YAML mapping), got {type(data).__name__}: "
            f"{str(data)[:60]!r}. E.g. `r: 16`."
        )
    return _settings(data, scope, "%%lora", "this cell")


def _settings(data: Mapping[Any, Any], scope: str, prefix: str, here: str) -> dict[str, Any]:
    """``data`` with canonical names, every key checked to be a setting of ``scope`` (did-you-mean otherwise)."""
    _check_keys(data, scope, prefix, here)
    return canonical(data, scope)


def _check_keys(given: Collection[Any], scope: str, prefix: str, here: str) -> None:
    """Each key names a setting of ``scope`` (or one of its other spellings): else a UsageError that says which
    command takes it, or offers close matches."""
    allowed, spellings = keys(scope), aliases(scope)
    for key in given:
        other = SETTINGS.get(name_of(key) or "")
        if other is not None and scope not in other.scopes:
            where = " or ".join(_CELLS[s] for s in other.scopes)
            raise UsageError(
                f"{prefix}: `{key}` is a setting of {where}, not of {here}. Settings here: {', '.join(allowed)}."
            )
        if not isinstance(key, str) or key not in allowed + spellings:
            raise UsageError(
                f"{prefix}: unknown setting `{key}`.{did_you_mean(str(key), allowed + spellings)} "
                f"Settings: {', '.join(allowed)}."
            )


def yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that rejects a key given twice (PyYAML would silently keep the last one)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"`{key}` is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.1 reads `lr: 2e-4` as a string (it wants `2.0e-4`); everyone writes it the short way.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def read_value(text: str, name: str = "value") -> Any:
    """One value read as a cell body reads it (``2e-4`` a number, ``[a, b]`` a list, ``true`` a flag, ``texts``
    text); a YAML error is a UsageError naming ``name``."""
    import yaml

    try:
        return yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        example = f" E.g. {name}: {SETTINGS[name].example}." if name in SETTINGS else ""
        raise UsageError(f"`{name}`: {text!r} cannot be read as a value ({problem}).{example}") from None


def write_value(value: Any) -> str:
    """``value`` as one line of YAML that ``read_value`` (and a cell body) reads back as the same value: lists and
    mappings in flow style, text quoted only where YAML would read it as something else."""
    import json

    import yaml

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    text = yaml.safe_dump(plain(value), default_flow_style=True, allow_unicode=True, width=1 << 20)
    text = text.removesuffix("\n...\n").rstrip("\n")
    if "\n" in text:  # a text with line breaks: JSON's escapes keep it on one line (YAML reads JSON)
        text = json.dumps(plain(value), ensure_ascii=False)
    return text


def _cell(line: str, settings: Mapping[str, Any]) -> str:
    return "\n".join([line, *(f"{k}: {write_value(v)}" for k, v in settings.items())])


def inject_cell(model: str, settings: Mapping[str, Any], name: str = "default") -> str:
    """The ``%%lora MODEL`` cell that injects with ``settings`` (canonical names); ``parse`` reads it back as an
    ``Inject`` with these settings."""
    return _cell(f"%%lora {model}" + (f" --name {shlex.quote(name)}" if name != "default" else ""), settings)


def train_cell(model: str, settings: Mapping[str, Any]) -> str:
    """The ``%%lora train MODEL`` cell that trains with ``settings`` (canonical names; ``data`` and the other
    notebook inputs as variable names or paths); ``parse`` reads it back as a ``Train`` with these settings."""
    return _cell(f"%%lora train {model}", settings)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value!r}")
    return n


def _nonnegative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return n


def _identifier(value: str, what: str = "MODEL") -> str:
    if not value.isidentifier():
        raise UsageError(f"%lora: `{what}` must be a variable name, got {value!r}.")
    return value


def parse(line: str, cell: str | None = None, models: Collection[str] | None = None) -> Command:
    """Turn a ``%lora`` line (and ``%%lora`` cell body) into a command object. Raises UsageError.

    ``models``: the names of the notebook variables that hold a model, when known. A first word that is one of
    them is the model to inject into even when it is close to a subcommand (``%%lora merged --dry-run``)."""
    words = _split(line)
    if not words:
        raise UsageError(
            "%lora: say what to do, e.g. `%%lora model` (inject) or `%lora status model`. See %lora help."
        )
    head, rest = words[0], words[1:]
    models = frozenset(models) if models is not None else None
    if head in ("help", "-h", "--help", "?"):
        return Help()
    if head in SUBCOMMANDS:
        try:
            return _SUBPARSERS[head](head, rest, cell)
        except UsageError as exc:
            if models is None or head not in models:
                raise
            raise UsageError(
                f"{exc} (`{head}` is also a model variable here, but `%lora {head}` is the subcommand: to inject "
                f"into that model, give it another name, e.g. `{head}_model = {head}`, then `%%lora {head}_model`.)"
            ) from None
    if head.startswith("-"):
        raise UsageError(
            f"%lora: the model variable comes first, got option {head!r}. E.g. `%%lora model --dry-run`."
        )
    if not head.isidentifier():
        close = did_you_mean(head, SUBCOMMANDS)
        if close or cell is None:
            raise UsageError(
                f"%lora: unknown subcommand {head!r}.{close} Subcommands: {', '.join(SUBCOMMANDS)}; or "
                "`%%lora MODEL` to inject."
            )
        raise UsageError(f"%%lora: `MODEL` must be a variable name, got {head!r}.")
    close = did_you_mean(head, SUBCOMMANDS)
    if close and (rest or cell is None) and (models is None or head not in models):
        # `%lora stauts model`: a misspelled subcommand, not a variable called stauts (no model is called so).
        also = f" No model variable is called `{head}` either." if models is not None else ""
        raise UsageError(
            f"%lora: unknown subcommand {head!r}.{close} Subcommands: {', '.join(SUBCOMMANDS)}.{also}"
        )
    return _parse_inject(head, rest, cell)


def _parse_inject(model: str, rest: list[str], cell: str | None) -> Inject:
    p = _parser("MODEL")
    p.add_argument("--name", default="default")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--replace", action="store_true")
    args = p.parse_args(rest)
    settings = _yaml(cell, "inject")
    return Inject(model=model, name=args.name, dry_run=args.dry_run, replace=args.replace, settings=settings)


def _parse_status(head: str, rest: list[str], cell: str | None) -> Status:
    p = _parser(head)
    p.add_argument("model", nargs="?")
    args = p.parse_args(rest)
    return Status(_identifier(args.model) if args.model else None)


def _parse_estimate(head: str, rest: list[str], cell: str | None) -> Estimate:
    p = _parser(head)
    p.add_argument("source")
    p.add_argument("--seq", type=_positive)
    p.add_argument("--batch", type=_positive)
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--optim", choices=_OPTIM, type=str.lower)
    p.add_argument("--dtype", choices=_DTYPES)
    p.add_argument("--audio-seconds", dest="audio_seconds", type=float)
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--4bit", dest="quant", action="store_const", const="4bit")
    quant.add_argument("--8bit", dest="quant", action="store_const", const="8bit")
    args = p.parse_args(rest)
    body = _yaml(cell, "estimate")
    options = {k: body.pop(k) for k in ESTIMATE_OPTIONS if k in body}
    for key in ESTIMATE_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            options[key] = value  # the line's options win over the body's
    return Estimate(source=args.source, options=options, settings=body)


def _parse_model(head: str, rest: list[str], cell: str | None) -> ModelCommand:
    p = _parser(head)
    p.add_argument("model")
    if head == "merge":
        p.add_argument("--dequantize", action="store_true")
    args = p.parse_args(rest)
    options = {"dequantize": True} if getattr(args, "dequantize", False) else {}
    return ModelCommand(head, _identifier(args.model), options)


def _parse_base(head: str, rest: list[str], cell: str | None) -> Base:
    p = _parser(head)
    p.add_argument("variable")
    p.add_argument("source")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--4bit", dest="bits", action="store_const", const=4)
    bits.add_argument("--8bit", dest="bits", action="store_const", const=8)
    p.add_argument("--dtype", choices=_DTYPES, default="bf16")
    args = p.parse_args(rest)
    return Base(_identifier(args.variable, "VAR"), args.source, args.bits, args.dtype)


def _parse_named(head: str, rest: list[str], cell: str | None) -> NamedCommand:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("name")
    args = p.parse_args(rest)
    return NamedCommand(head, _identifier(args.model), args.name)


def _parse_save(head: str, rest: list[str], cell: str | None) -> Save:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("path")
    p.add_argument("--merged", action="store_true")
    p.add_argument("--name")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(rest)
    return Save(_identifier(args.model), args.path, args.merged, args.name, args.overwrite)


def _parse_load(head: str, rest: list[str], cell: str | None) -> Load:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("path")
    p.add_argument("--name", default="default")
    p.add_argument("--hotswap", action="store_true")
    args = p.parse_args(rest)
    return Load(_identifier(args.model), args.path, args.name, args.hotswap)


def _parse_compare(head: str, rest: list[str], cell: str | None) -> Compare:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--tokenizer")
    p.add_argument("--max-new-tokens", type=_positive)
    p.add_argument("--processor")
    p.add_argument("--image", action="append", default=[])
    args = p.parse_args(rest)
    prompt = args.prompt if args.prompt is not None else (cell or "").strip()
    if not prompt:
        raise UsageError('%lora compare: give a prompt, e.g. %lora compare model "Once upon a time".')
    tokenizer = _identifier(args.tokenizer, "--tokenizer") if args.tokenizer else None
    processor = _identifier(args.processor, "--processor") if args.processor else None
    images = tuple(i.strip() for given in args.image for i in given.split(",") if i.strip())
    return Compare(_identifier(args.model), prompt, tokenizer, args.max_new_tokens, processor, images)


def _joined_list(tokens: list[str], option: str) -> list[str]:
    """``tokens`` with the comma list after ``option`` in one token: ``--adapters a, b`` (a space after a comma,
    as people type lists) must not turn ``b`` into a prompt."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        out.append(token)
        i += 1
        if token == option and i < len(tokens):
            value = tokens[i]
            i += 1
            while i < len(tokens) and (value.endswith(",") or tokens[i].startswith(",")):
                value += tokens[i]
                i += 1
            out.append(value)
    return out


def _parse_generate(head: str, rest: list[str], cell: str | None) -> Generate:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("prompts", nargs="*", metavar="prompt")
    p.add_argument("--adapters")
    p.add_argument("--tokenizer")
    p.add_argument("--max-new-tokens", type=_positive)
    args = p.parse_intermixed_args(_joined_list(rest, "--adapters"))  # prompts before and after the options
    prompts = [*args.prompts, *(line.strip() for line in (cell or "").splitlines() if line.strip())]
    if not prompts:
        raise UsageError(
            '%lora generate: give one or more prompts, e.g. %lora generate model --adapters a,b,base "Once upon a '
            'time" (or a prompt a line under %%lora generate model).'
        )
    adapters = None
    if args.adapters is not None:
        adapters = tuple(a.strip() for a in args.adapters.split(",") if a.strip())
        if not adapters:
            raise UsageError(
                f"%lora generate: `--adapters` {args.adapters!r} names no adapter; e.g. --adapters a,b,base."
            )
    tokenizer = _identifier(args.tokenizer, "--tokenizer") if args.tokenizer else None
    return Generate(_identifier(args.model), tuple(prompts), adapters, tokenizer, args.max_new_tokens)


def _parse_chat(head: str, rest: list[str], cell: str | None) -> Chat:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("--tokenizer")
    p.add_argument("--processor")
    p.add_argument("settings", nargs="*", metavar="setting=value")
    args = p.parse_intermixed_args(rest)  # settings before and after --tokenizer / --processor
    settings = _yaml(cell, "chat")
    line: dict[str, Any] = {}
    for word in args.settings:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise UsageError(
                f"%lora chat: {word!r} is not a setting=value pair. Write e.g. temperature=0.7; settings: "
                f"{', '.join(keys('chat'))}."
            )
        _check_keys([key], "chat", "%lora chat", "%lora chat")
        line[key] = _line_value(name_of(key), value)
    settings.update(canonical(line, "chat"))  # the line's settings win over the body's
    tokenizer = _identifier(args.tokenizer, "--tokenizer") if args.tokenizer else None
    processor = _identifier(args.processor, "--processor") if args.processor else None
    return Chat(_identifier(args.model), tokenizer, settings, processor)


def _line_value(name: str, value: str) -> Any:
    """A ``setting=value`` value: numbers read as in YAML (``2e-4``, ``40``); anything else stays the text typed
    (``adapter=off`` is the choice "off", not YAML's false)."""
    if SETTINGS[name].kind in ("int", "float"):
        import yaml

        try:
            return yaml.load(value, Loader=yaml_loader())
        except yaml.YAMLError:
            return value
    return value


def _parse_train(head: str, rest: list[str], cell: str | None) -> Train:
    p = _parser(head)
    p.add_argument("model")
    args = p.parse_args(rest)
    settings = _yaml(cell, "train")
    if "data" not in settings:
        raise UsageError(
            "%%lora train: the cell body needs `data:` — a variable holding texts/records/a Dataset/a DataFrame, or a "
            ".jsonl/.csv/.txt path (e.g. `data: texts` and `steps: 100` under `%%lora train model`)."
        )
    return Train(_identifier(args.model), settings)


_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.S)


def _line_settings(words: list[str], prefix: str) -> tuple[list[str], dict[str, Any]]:
    """Split ``key=value`` words off a line: (the other words, ``{key: value}`` with YAML values: ``seq=256``
    is a number, ``packing=true`` a bool, ``text_column=body`` text)."""
    import yaml

    rest, given = [], {}
    for word in words:
        match = _ASSIGNMENT.match(word)
        if match is None:
            rest.append(word)
            continue
        key, text = match.groups()
        if key in given:
            raise UsageError(f"{prefix}: `{key}` is given twice on the line; keep one.")
        setting = SETTINGS.get(name_of(key) or "")
        if setting is not None and setting.kind == "text" and text.strip():
            given[key] = text  # text as written: a Jinja template or a name is not YAML
            continue
        try:
            given[key] = yaml.load(text, Loader=yaml_loader()) if text.strip() else None
        except yaml.YAMLError:
            raise UsageError(
                f"{prefix}: the value of `{word}` cannot be read as YAML; quote it twice, e.g. {key}=\"'{text}'\", "
                "or give it in a %%lora cell body."
            ) from None
    return rest, given


def _parse_data(head: str, rest: list[str], cell: str | None) -> Data:
    rest, line = _line_settings(rest, "%lora data")
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("data", nargs="?")
    p.add_argument("--n", type=_nonnegative, default=3)
    args = p.parse_args(rest)
    settings = _yaml(cell, "train")
    for key, value in _settings(line, "train", "%lora data", "this line").items():
        settings[key] = value  # the line's settings win over the body's
    if args.data is not None:
        if "data" in settings and settings["data"] != args.data:
            raise UsageError(
                f"%lora data: the data is given twice, as {args.data!r} and as `data: {settings['data']}`; keep one."
            )
        settings["data"] = args.data
    if "data" not in settings:
        raise UsageError(
            "%lora data: say which data to preview: `%lora data MODEL DATA`, DATA a variable holding texts/records/"
            "a Dataset/a DataFrame or a .jsonl/.csv/.txt path (or `data:` in the body of %%lora data MODEL)."
        )
    return Data(_identifier(args.model), settings, args.n)


def _parse_panel(head: str, rest: list[str], cell: str | None) -> PanelCommand:
    p = _parser(head)
    p.add_argument("model")
    args = p.parse_args(rest)
    return PanelCommand(_identifier(args.model))


def _parse_export(head: str, rest: list[str], cell: str | None) -> Export:
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("directory")
    args = p.parse_args(rest)
    settings = _yaml(cell, "train")
    if "data" not in settings:
        raise UsageError(
            "%%lora export: the cell body needs `data:` (as for %%lora train) — the job trains on it; e.g. "
            "`data: texts` and `steps: 1000` under `%%lora export model job/`."
        )
    return Export(_identifier(args.model), args.directory, settings)


def _parse_stop(head: str, rest: list[str], cell: str | None) -> Stop:
    p = _parser(head)
    p.add_argument("model", nargs="?")
    args = p.parse_args(rest)
    return Stop(_identifier(args.model) if args.model else None)


def _parse_resume(head: str, rest: list[str], cell: str | None) -> Resume:
    rest, line = _line_settings(rest, "%lora resume")
    p = _parser(head)
    p.add_argument("model")
    p.add_argument("checkpoint", nargs="?")
    args = p.parse_args(rest)
    settings = _yaml(cell, "train")
    settings.update(_settings(line, "train", "%lora resume", "this line"))  # the line's settings win
    return Resume(_identifier(args.model), args.checkpoint, settings)


def _parse_runs(head: str, rest: list[str], cell: str | None) -> Runs:
    p = _parser(head)
    p.add_argument("target", nargs="?", metavar="MODEL|DIR")
    args = p.parse_args(rest)
    return Runs(args.target)


def _parse_sweep(head: str, rest: list[str], cell: str | None) -> SweepCommand:
    from ..core.sweep.grid import sweep_keys

    p = _parser(head)
    p.add_argument("model")
    args = p.parse_args(rest)
    import yaml

    try:
        body = yaml.load(cell or "", Loader=yaml_loader()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(
            f"%%lora sweep: the cell body is not valid YAML: {getattr(exc, 'problem', exc)}."
        ) from None
    if not isinstance(body, dict):
        raise UsageError("%%lora sweep: the cell body must be `key: value` lines, e.g. `grid: {r: [4, 8]}`.")
    grid, runs = body.pop("grid", None), body.pop("runs", None)
    objects = tuple(k for k in keys("train") if SETTINGS[k].kind == "object")
    allowed = (*sweep_keys(), *objects, "keep", "output_dir", "progress")  # progress: how the board shows
    settings = canonical(body, allowed, "%%lora sweep setting")
    if "data" not in settings:
        raise UsageError(
            "%%lora sweep: the cell body needs `data:` (a variable or a path), as for %%lora train."
        )
    return SweepCommand(_identifier(args.model), grid, runs, settings)


def _parse_help(head: str, rest: list[str], cell: str | None) -> Help:
    return Help()


_SUBPARSERS = {
    "status": _parse_status,
    "estimate": _parse_estimate,
    "merge": _parse_model,
    "unload": _parse_model,
    "enable": _parse_model,
    "disable": _parse_model,
    "use": _parse_named,
    "delete": _parse_named,
    "save": _parse_save,
    "load": _parse_load,
    "compare": _parse_compare,
    "chat": _parse_chat,
    "generate": _parse_generate,
    "train": _parse_train,
    "panel": _parse_panel,
    "base": _parse_base,
    "export": _parse_export,
    "stop": _parse_stop,
    "resume": _parse_resume,
    "data": _parse_data,
    "runs": _parse_runs,
    "sweep": _parse_sweep,
    "help": _parse_help,
}
