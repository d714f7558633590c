"""User mistakes, one table row each: every one must raise a ``UsageError`` (or subclass) whose message names the
parameter in backticks, shows the value received and says something useful — and must leave the model and the
files exactly as they were.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot, tree_snapshot
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.errors import AdapterMismatchError, NoAdapterError, TargetError, UsageError
from jupyter_lora.testing import tiny_config, tiny_model

# ----------------------------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Files the cases point at, built once and copied into each test's own workspace."""
    root = tmp_path_factory.mktemp("library")
    (root / "file.txt").write_text("my notes, not a model\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("train a LoRA\n")
    tiny_config("llama").save_pretrained(root / "full")  # a full model's directory: config.json only
    assert os.listdir(root / "full") == ["config.json"]
    jl.save(jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj"), root / "adapter_run1")
    jl.save(jl.inject(tiny_model("gpt2"), r=4, targets="c_attn"), root / "gpt2_adapter")
    return root


class Blockless(nn.Module):
    """A model without repeated layer blocks (nothing for `layers` to choose from)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _adapted() -> nn.Module:
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj", name="chat")
    model = jl.inject(model, r=4, targets="q_proj,v_proj", name="code")
    return jl.use(model, "chat")


def _blockless() -> nn.Module:
    torch.manual_seed(0)
    return Blockless()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: tiny_model("llama"),
    "llama64": lambda: tiny_model("llama", hidden_size=64, intermediate_size=128),  # same arch, other sizes
    "bert": lambda: tiny_model("bert"),
    "blockless": _blockless,
    "single": lambda: jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj"),  # one adapter, "default"
    "adapted": _adapted,  # adapters "chat" (active) and "code"
}


@dataclass
class Ctx:
    model: nn.Module
    ws: Path  # this test's copy of the library

    def __truediv__(self, name: str) -> Path:
        return self.ws / name


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    error: type[Exception]
    param: str | None  # the parameter the message must name, in backticks
    shows: tuple[str, ...]  # the bad value as the message must show it ("{ws}" is this test's workspace)
    match: tuple[str, ...]  # regexes for the helpful part (suggestion, reason, what to do)
    model: str = "llama"
    forbid: tuple[str, ...] = ()  # regexes the message must not match
    prepare: Callable[[Ctx], None] | None = None


def _lock(ctx: Ctx) -> None:
    """A directory the user cannot write into (chmod 0o500). Root ignores modes: skip then."""
    locked = ctx / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    probe = locked / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return
    probe.unlink()
    os.chmod(locked, 0o700)
    pytest.skip("running as root: chmod 0o500 does not stop root from writing (see the sysfs case)")


def _unwritable_system_dir(ctx: Ctx) -> None:
    """/sys refuses new directories even to root."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    probe = Path("/sys/jupyter_lora_probe")
    try:
        probe.mkdir()
    except OSError:
        return
    probe.rmdir()
    pytest.skip("/sys accepts new directories here")


ADAPTER_HINT = r"(?i)inject"

CASES = [
    # --- rank, alpha, dropout
    Case("r-zero", lambda c: jl.plan(c.model, r=0), UsageError, "r", ("0",), (r"at least 1",)),
    Case("r-negative", lambda c: jl.inject(c.model, r=-4), UsageError, "r", ("-4",), (r"at least 1",)),
    Case("r-float", lambda c: jl.inject(c.model, r=2.5), UsageError, "r", ("2.5",), (r"whole number",)),
    Case("r-string", lambda c: jl.inject(c.model, r="8"), UsageError, "r", ("'8'",), (r"whole number",)),
    Case("r-bool", lambda c: jl.plan(c.model, r=True), UsageError, "r", ("True",), (r"whole number",)),
    Case("alpha-zero", lambda c: jl.inject(c.model, alpha=0), UsageError, "alpha", ("0",), (r"positive",)),
    Case(
        "alpha-negative", lambda c: jl.plan(c.model, alpha=-16), UsageError, "alpha", ("-16",), (r"positive",)
    ),
    Case(
        "alpha-string", lambda c: jl.inject(c.model, alpha="16"), UsageError, "alpha", ("'16'",), (r"number",)
    ),
    Case(
        "alpha-nan",
        lambda c: jl.inject(c.model, alpha=float("nan")),
        UsageError,
        "alpha",
        ("nan",),
        ("positive",),
    ),
    Case(
        "dropout-one",
        lambda c: jl.inject(c.model, dropout=1.0),
        UsageError,
        "dropout",
        ("1.0",),
        (r"\[0, 1\)",),
    ),
    Case(
        "dropout-negative",
        lambda c: jl.plan(c.model, dropout=-0.1),
        UsageError,
        "dropout",
        ("-0.1",),
        (r"\[0, 1\)",),
    ),
    Case(
        "dropout-string",
        lambda c: jl.inject(c.model, dropout="0.1"),
        UsageError,
        "dropout",
        ("'0.1'",),
        (r"number",),
    ),
    # --- targets
    Case(
        "targets-empty",
        lambda c: jl.inject(c.model, targets=""),
        TargetError,
        "targets",
        (),
        (r"is empty", r"q_proj"),
    ),
    Case(
        "targets-only-commas",
        lambda c: jl.inject(c.model, targets=" , "),
        TargetError,
        "targets",
        (),
        (r"is empty",),
    ),
    Case(
        "targets-misspelled",
        lambda c: jl.inject(c.model, targets="q_prj"),
        TargetError,
        "targets",
        ("'q_prj'",),
        (r"[Dd]id you mean `q_proj`",),
    ),
    Case(
        "targets-misspelled-in-list",
        lambda c: jl.inject(c.model, targets=["q_proj", "v_porj"]),
        TargetError,
        "targets",
        ("'v_porj'",),
        (r"[Dd]id you mean `v_proj`",),
    ),
    Case(
        "targets-not-adaptable",
        lambda c: jl.inject(c.model, targets="input_layernorm"),
        TargetError,
        "targets",
        ("'input_layernorm'",),
        (r"cannot take LoRA", r"LlamaRMSNorm"),
    ),
    Case(
        "targets-container",
        lambda c: jl.inject(c.model, targets="self_attn"),
        TargetError,
        "targets",
        ("'self_attn'",),
        (r"cannot take LoRA", r"`q_proj`"),
    ),
    Case(
        "targets-partial-regex",
        lambda c: jl.inject(c.model, targets="re:q_proj"),
        TargetError,
        "targets",
        ("'re:q_proj'",),
        (r"full path", r"re:\.\*q_proj"),
    ),
    Case(
        "targets-invalid-regex",
        lambda c: jl.inject(c.model, targets="re:(("),
        TargetError,
        "targets",
        ("((",),
        (r"not valid",),
    ),
    Case(
        "targets-not-a-string",
        lambda c: jl.inject(c.model, targets=5),
        UsageError,
        "targets",
        ("5",),
        (r"comma-separated",),
    ),
    Case(
        "targets-list-with-int",
        lambda c: jl.inject(c.model, targets=["q_proj", 3]),
        UsageError,
        "targets",
        ("3",),
        (r"strings",),
    ),
    # --- layers and exclude
    Case(
        "layers-out-of-range",
        lambda c: jl.inject(c.model, targets="q_proj", layers="0-99"),
        UsageError,
        "layers",
        ("'0-99'",),
        (r"out of range", r"2 layers", r"0-1"),
    ),
    Case(
        "layers-backwards",
        lambda c: jl.inject(c.model, targets="q_proj", layers="3-1"),
        UsageError,
        "layers",
        ("'3-1'",),
        (r"backwards", r"1-3"),
    ),
    Case(
        "layers-not-a-range",
        lambda c: jl.inject(c.model, targets="q_proj", layers="first"),
        UsageError,
        "layers",
        ("'first'",),
        (r"not an index or a range",),
    ),
    Case(
        "layers-float",
        lambda c: jl.plan(c.model, targets="q_proj", layers=1.5),
        UsageError,
        "layers",
        ("1.5",),
        (r"indices",),
    ),
    Case(
        "layers-keep-none",
        lambda c: jl.inject(c.model, targets="lm_head", layers="0"),
        TargetError,
        "layers",
        ("'0'",),
        (r"keeps none", r"lm_head"),
    ),
    Case(
        "layers-on-model-without-blocks",
        lambda c: jl.inject(c.model, targets="fc1", layers="0"),
        UsageError,
        "layers",
        ("'0'",),
        (r"no repeated layer blocks",),
        model="blockless",
    ),
    Case(
        "exclude-everything",
        lambda c: jl.inject(c.model, targets="q_proj", exclude="q_proj"),
        TargetError,
        "exclude",
        ("'q_proj'",),
        (r"removes every",),
    ),
    Case(
        "exclude-misspelled",
        lambda c: jl.inject(c.model, targets="attention", exclude="o_prj"),
        TargetError,
        "exclude",
        ("'o_prj'",),
        (r"[Dd]id you mean `o_proj`",),
    ),
    # --- not a model
    Case(
        "model-is-state-dict",
        lambda c: jl.inject(c.model.state_dict(), r=8),
        UsageError,
        "model",
        ("OrderedDict",),
        (r"nn\.Module",),
    ),
    Case(
        "model-is-model-id",
        lambda c: jl.plan("meta-llama/Llama-3.2-1B", r=8),
        UsageError,
        "model",
        ("'meta-llama/Llama-3.2-1B'",),
        (r"nn\.Module", r"from_pretrained"),
    ),
    Case("model-is-none", lambda c: jl.inject(None), UsageError, "model", ("None",), (r"nn\.Module",)),
    # --- no adapter on the model
    Case(
        "merge-no-adapter",
        lambda c: jl.merge(c.model),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    Case(
        "save-no-adapter",
        lambda c: jl.save(c.model, c / "out"),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    Case(
        "use-no-adapter",
        lambda c: jl.use(c.model, "default"),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    Case(
        "delete-no-adapter",
        lambda c: jl.delete(c.model, "default"),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    Case(
        "unload-no-adapter",
        lambda c: jl.unload(c.model),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    Case(
        "disable-no-adapter",
        lambda c: jl.disable(c.model),
        NoAdapterError,
        None,
        (),
        (r"no LoRA adapter", ADAPTER_HINT),
    ),
    # --- unknown adapter names
    Case(
        "use-unknown-name",
        lambda c: jl.use(c.model, "chta"),
        NoAdapterError,
        "name",
        ("'chta'",),
        (r"[Dd]id you mean `chat`",),
        model="adapted",
    ),
    Case(
        "delete-unknown-name",
        lambda c: jl.delete(c.model, "cod"),
        NoAdapterError,
        "name",
        ("'cod'",),
        (r"[Dd]id you mean `code`",),
        model="adapted",
    ),
    Case(
        "merge-unknown-name",
        lambda c: jl.merge(c.model, "chta"),
        NoAdapterError,
        "name",
        ("'chta'",),
        (r"[Dd]id you mean `chat`",),
        model="adapted",
    ),
    Case(
        "save-unknown-name",
        lambda c: jl.save(c.model, c / "out", name="chta"),
        NoAdapterError,
        "name",
        ("'chta'",),
        (r"[Dd]id you mean `chat`",),
        model="adapted",
    ),
    Case(
        "delete-only-adapter",
        lambda c: jl.delete(c.model, "default"),
        UsageError,
        None,
        ("'default'",),
        (r"only adapter", r"unload"),
        model="single",
    ),
    # --- saving
    Case(
        "save-to-existing-file",
        lambda c: jl.save(c.model, c / "file.txt"),
        UsageError,
        "path",
        ("{ws}/file.txt",),
        (r"existing file",),
        model="single",
    ),
    Case(
        "save-under-a-file",
        lambda c: jl.save(c.model, c / "file.txt" / "adapter"),
        UsageError,
        "path",
        ("{ws}/file.txt",),
        (r"file\.txt\W*( is a file|is not a directory)",),
        model="single",
    ),
    Case(
        "save-into-read-only-dir",
        lambda c: jl.save(c.model, c / "locked" / "adapter"),
        UsageError,
        "path",
        ("{ws}/locked/adapter",),
        (r"permission",),
        model="single",
        prepare=_lock,
    ),
    Case(
        "save-into-unwritable-system-dir",
        lambda c: jl.save(c.model, "/sys/jupyter_lora_adapter"),
        UsageError,
        "path",
        ("/sys/jupyter_lora_adapter",),
        (r"permission",),
        model="single",
        prepare=_unwritable_system_dir,
    ),
    Case(
        "save-over-unrelated-files",
        lambda c: jl.save(c.model, c / "notes"),
        UsageError,
        "path",
        ("{ws}/notes",),
        (r"non-empty directory", r"empty or new directory"),
        model="single",
    ),
    Case(
        "save-path-empty",
        lambda c: jl.save(c.model, ""),
        UsageError,
        "path",
        ("''",),
        (r"directory path",),
        model="single",
    ),
    # --- loading
    Case(
        "load-missing-path",
        lambda c: jl.load(c.model, c / "adapter_rn1"),
        UsageError,
        "path",
        ("{ws}/adapter_rn1",),
        (r"does not exist", r"[Dd]id you mean `adapter_run1`"),
    ),
    Case(
        "load-dir-without-adapter-config",
        lambda c: jl.load(c.model, c / "notes"),
        UsageError,
        "path",
        ("{ws}/notes",),
        (r"adapter_config\.json",),
    ),
    Case(
        "load-full-model-dir",
        lambda c: jl.load(c.model, c / "full"),
        UsageError,
        "path",
        ("{ws}/full",),
        (r"full model", r"from_pretrained"),
    ),
    Case(
        "load-gpt2-adapter-into-llama",
        lambda c: jl.load(c.model, c / "gpt2_adapter"),
        AdapterMismatchError,
        "path",
        ("{ws}/gpt2_adapter",),
        (r"does not fit", r"c_attn"),
        # each missing module named once; tiny gpt2 has 2 c_attn modules (4 tensors), not "4 modules"
        forbid=(r"(`transformer\.h\.0\.attn\.c_attn`).*\1", r"\b4 modules"),
    ),
    Case(
        "load-adapter-of-other-size",
        lambda c: jl.load(c.model, c / "adapter_run1"),
        AdapterMismatchError,
        "path",
        ("{ws}/adapter_run1",),
        (r"does not fit", r"64→64", r"lora_A"),
        model="llama64",
    ),
    Case(
        "load-bad-adapter-name",
        lambda c: jl.load(c.model, c / "adapter_run1", name="my adapter"),
        UsageError,
        "name",
        ("'my adapter'",),
        (r"letters, digits",),
    ),
    Case(
        "load-path-not-a-path",
        lambda c: jl.load(c.model, 5),
        UsageError,
        "path",
        ("5",),
        (r"directory path",),
    ),
    # --- other settings
    Case(
        "variant-typo",
        lambda c: jl.inject(c.model, variant="dorra"),
        UsageError,
        "variant",
        ("'dorra'",),
        (r"[Dd]id you mean `dora`",),
    ),
    Case(
        "init-typo",
        lambda c: jl.inject(c.model, init="gausian"),
        UsageError,
        "init",
        ("'gausian'",),
        (r"[Dd]id you mean `gaussian`",),
    ),
    Case(
        "init-needs-data",
        lambda c: jl.inject(c.model, init="eva"),
        UsageError,
        "init",
        ("'eva'",),
        (r"not available", r"data"),
    ),
    Case(
        "bias-typo",
        lambda c: jl.inject(c.model, bias="al"),
        UsageError,
        "bias",
        ("'al'",),
        (r"[Dd]id you mean `all`",),
    ),
    Case(
        "setting-typo",
        lambda c: jl.inject(c.model, r=8, alhpa=16),
        UsageError,
        "alhpa",
        (),
        (r"Unknown LoRA setting", r"[Dd]id you mean `alpha`"),
    ),
    Case(
        "setting-typo-peft-spelling",
        lambda c: jl.inject(c.model, target_module="q_proj"),
        UsageError,
        "target_module",
        (),
        (r"Unknown LoRA setting", r"`target_modules`"),
    ),
    Case(
        "setting-twice-under-alias",
        lambda c: jl.inject(c.model, r=8, rank=4),
        UsageError,
        "r",
        (),
        (r"twice", r"`rank`", r"\b8\b", r"\b4\b"),
    ),
    Case(
        "targets-twice-under-alias",
        lambda c: jl.plan(c.model, targets="q_proj", target_modules="v_proj"),
        UsageError,
        "targets",
        (),
        (r"twice", r"`target_modules`", r"q_proj", r"v_proj"),
    ),
    Case(
        "module-targeted-and-saved",
        lambda c: jl.inject(c.model, targets="lm_head", modules_to_save="lm_head"),
        UsageError,
        "modules_to_save",
        ("lm_head",),
        (r"both a LoRA target and inside",),
    ),
    Case(
        "classifier-head-targeted",
        lambda c: jl.inject(c.model, targets="query,value,classifier"),
        UsageError,
        "modules_to_save",
        ("classifier",),
        (r"both a LoRA target and inside", r"exclude"),
        model="bert",
    ),
    Case(
        "adapter-name-with-space",
        lambda c: jl.inject(c.model, name="my adapter"),
        UsageError,
        "name",
        ("'my adapter'",),
        (r"letters, digits",),
    ),
    Case(
        "adapter-name-empty",
        lambda c: jl.inject(c.model, name=""),
        UsageError,
        "name",
        ("''",),
        (r"letters, digits",),
    ),
    Case(
        "task-type-unknown",
        lambda c: jl.inject(c.model, task_type="casual_lm"),
        UsageError,
        "task_type",
        ("'casual_lm'",),
        (r"[Dd]id you mean `CAUSAL_LM`",),
    ),
    Case(
        "modules-to-save-missing",
        lambda c: jl.inject(c.model, targets="query,value", modules_to_save="clasifier"),
        UsageError,
        "modules_to_save",
        ("'clasifier'",),
        (r"[Dd]id you mean `classifier`",),
        model="bert",
    ),
    # --- memory estimate
    Case(
        "estimate-optimizer-typo",
        lambda c: jl.estimate(c.model, optim="adamm"),
        UsageError,
        "optim",
        ("'adamm'",),
        (r"[Dd]id you mean `adamw`",),
    ),
    Case(
        "estimate-seq-zero",
        lambda c: jl.estimate(c.model, seq=0),
        UsageError,
        "seq",
        ("0",),
        (r"positive whole number",),
    ),
    Case(
        "estimate-dtype-unknown",
        lambda c: jl.estimate(c.model, dtype="fp8"),
        UsageError,
        "dtype",
        ("'fp8'",),
        (r"bf16",),
    ),
    # --- values past what can be built, and arguments in the wrong place
    Case(
        "r-huge-float",
        lambda c: jl.plan(c.model, r=1e30),
        UsageError,
        "r",
        ("1e+30",),
        (r"at most 65536", r"E\.g\. r: 16"),
    ),
    Case(
        "r-huge-int",
        lambda c: jl.inject(c.model, r=10**30),
        UsageError,
        "r",
        (str(10**30),),
        (r"at most 65536",),
    ),
    Case(
        "init-pissa-niter-not-a-number",
        lambda c: jl.inject(c.model, init="pissa_niter_abc"),
        UsageError,
        "init",
        ("'pissa_niter_abc'",),
        (r"pissa_niter_4",),
    ),
    Case(
        "layers-mapping",
        lambda c: jl.inject(c.model, targets="q_proj", layers={"a": 1}),
        UsageError,
        "layers",
        ("'a': 1",),  # (braces would be read as a {ws} placeholder)
        (r"0-11, 20",),
    ),
    Case(
        "spec-given-as-settings-text",
        lambda c: jl.plan(c.model, spec="r=4"),
        UsageError,
        "spec",
        ("'r=4'",),
        (r"LoraSpec", r"plan\(model, r=4\)"),
    ),
    Case(
        "spec-given-as-target-names",
        lambda c: jl.inject(c.model, "q_proj,v_proj"),
        UsageError,
        "spec",
        ("'q_proj,v_proj'",),
        (r"targets='q_proj,v_proj'",),
    ),
    Case(
        "adapter-name-taken-by-torch",
        lambda c: jl.inject(c.model, name="train"),
        UsageError,
        "name",
        ("'train'",),
        (r"ModuleDict", r"name: train_lora"),
    ),
    Case(
        "load-adapter-name-taken-by-torch",
        lambda c: jl.load(c.model, c / "adapter_run1", name="keys"),
        UsageError,
        "name",
        ("'keys'",),
        (r"ModuleDict",),
        model="single",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, library: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(library, ws)
    ctx = Ctx(model=MODELS[case.model](), ws=ws)
    if case.prepare is not None:
        case.prepare(ctx)
    before = model_snapshot(ctx.model)
    files = tree_snapshot(tmp_path)
    try:
        with pytest.raises(case.error) as excinfo:
            case.call(ctx)
    finally:
        locked = ws / "locked"
        if locked.exists():
            os.chmod(locked, 0o700)
    assert isinstance(excinfo.value, UsageError)

    # nothing changed: the model, and every file and directory in the workspace (no leftovers either)
    assert_model_unchanged(before, ctx.model)
    assert tree_snapshot(tmp_path) == files

    message = str(excinfo.value)
    problems = []
    if case.param is not None and f"`{case.param}`" not in message:
        problems.append(f"does not name `{case.param}` in backticks")
    for shown in case.shows:
        shown = shown.format(ws=ws)
        if shown not in message:
            problems.append(f"does not show the value {shown!r}")
    problems += [f"does not match {p!r}" for p in case.match if not re.search(p, message)]
    problems += [f"matches forbidden {p!r}" for p in case.forbid if re.search(p, message)]
    assert not problems, f"{type(excinfo.value).__name__}: {message}\n  -> " + "; ".join(problems)


def test_enough_cases() -> None:
    assert len(CASES) >= 24
    assert len({c.id for c in CASES}) == len(CASES)
