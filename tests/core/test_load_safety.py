"""Loading a saved adapter never changes the base model's weights, and an adapter whose files would load wrongly
(or not at all) is refused with one line that says what is wrong, leaving the model and the files as they were.
Adapters named by Hub id come through the Hugging Face cache and get the same checks.
"""

from __future__ import annotations

import builtins
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot, tree_snapshot
from safetensors.torch import load_file, save_file
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.errors import AdapterMismatchError, UsageError
from jupyter_lora.core.modelinfo import ADAPTER_PARAM, base_model_of
from jupyter_lora.testing import tiny_inputs, tiny_model

# ----------------------------------------------------------------------------------------------- helpers


def _trained(arch: str = "llama", **settings) -> nn.Module:
    """An adapted tiny model whose LoRA B weights are non-zero, so the adapter changes the outputs."""
    model = jl.inject(tiny_model(arch), r=4, **settings)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Adapters saved once; each test edits its own copy."""
    root = tmp_path_factory.mktemp("adapters")
    jl.save(_trained(targets="q_proj,v_proj"), root / "plain")
    jl.save(_trained(targets="q_proj", variant="dora"), root / "dora")
    jl.save(_trained("bert"), root / "bert")  # a classifier: its head is in modules_to_save
    jl.save(_trained(targets="embed_tokens,q_proj"), root / "embed")  # carries the embedding matrix too
    return root


def _copy(library: Path, tmp_path: Path, name: str = "plain", to: str = "adapter") -> Path:
    return Path(shutil.copytree(library / name, tmp_path / to))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(
    path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]
) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = edit(tensors) or tensors
    save_file(tensors, path / "adapter_model.safetensors")


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors (under a PeftModel: without adapters, PEFT's ``base_layer`` step removed)."""
    state = {}
    for key, value in base_model_of(model).state_dict().items():
        if ADAPTER_PARAM.search(f".{key}") or ".original_module." in key:
            continue
        state[key.replace(".base_layer", "")] = value.detach().clone()
    return state


def _assert_bit_identical(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = _base_state(model)
    assert sorted(after) == sorted(before)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"base weights changed: {changed}"


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(model)).logits


# ----------------------------------------------------------------------------------------------- A: the base stays


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_initialisation_in_config_never_touches_the_base(init, library, tmp_path):
    """PiSSA, OLoRA... rewrite base weights when an adapter is created; a loaded adapter brings its tensors, so
    the initialisation must not run: every base tensor stays bit-identical, after load and after unload."""
    path = _copy(library, tmp_path)
    loftq = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if init == "loftq" else {}
    _edit_config(path, init_lora_weights=init, **loftq)
    expected = _logits(jl.load(tiny_model("llama"), library / "plain"))

    base = tiny_model("llama")
    before = _base_state(base)
    loaded = jl.load(base, path)
    _assert_bit_identical(before, loaded)
    assert torch.allclose(_logits(loaded), expected, atol=1e-6)  # the adapter works as saved
    _assert_bit_identical(before, jl.unload(loaded))


def test_initialisation_in_config_never_touches_the_base_of_an_adapted_model(library, tmp_path):
    path = _copy(library, tmp_path)
    _edit_config(path, init_lora_weights="pissa")
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj", name="chat")
    before = _base_state(model)
    loaded = jl.load(model, path, name="other")
    assert jl.status(loaded).active == ("other",)
    _assert_bit_identical(before, loaded)
    _assert_bit_identical(before, jl.unload(loaded))


def test_embedding_matrix_saved_with_the_adapter_loads_when_it_is_the_models_own(library):
    base = tiny_model("llama")
    before = _base_state(base)
    loaded = jl.load(base, library / "embed")
    _assert_bit_identical(before, loaded)


def test_adapter_loaded_beside_another_is_frozen_when_asked(library):
    model = jl.inject(tiny_model("llama"), r=4, targets="q_proj,v_proj", name="chat")
    loaded = jl.load(model, library / "plain", name="other", trainable=False)
    grads = {p.requires_grad for n, p in loaded.named_parameters() if ".other." in n}
    assert grads == {False}


# ----------------------------------------------------------------------------------------------- B, C: refused


def _nan(t):
    key = next(k for k in t if "lora_A" in k)
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")


def _inf(t):
    key = next(k for k in t if "lora_B" in k)
    t[key] = t[key].clone()
    t[key][0, 0] = float("inf")


def _integers(t):
    return {k: (v * 100).to(torch.int32) for k, v in t.items()}


def _drop(suffix: str):
    def edit(t):
        key = next(k for k in t if k.endswith(suffix))
        return {k: v for k, v in t.items() if k != key}

    return edit


def _other_norm(t):
    t["base_model.model.model.norm.weight"] = torch.zeros(32)


def _raw_config(content: bytes):
    def prepare(path: Path) -> None:
        (path / "adapter_config.json").write_bytes(content)

    return prepare


def _config_is_a_directory(path: Path) -> None:
    (path / "adapter_config.json").unlink()
    (path / "adapter_config.json").mkdir()


class _RunsCode:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def _malicious_bin(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    torch.save({"weights": _RunsCode(path.parent / "ran.txt")}, path / "adapter_model.bin")


@dataclass(frozen=True)
class Bad:
    id: str
    prepare: Callable[[Path], None]  # edits this test's copy of the adapter
    match: tuple[str, ...]  # regexes the one-line message must match
    source: str = "plain"
    model: str = "llama"
    error: type[Exception] = UsageError
    forbid: tuple[str, ...] = ()


def _tensors(edit):
    return lambda path: _edit_tensors(path, edit)


def _config(**changes):
    return lambda path: _edit_config(path, **changes)


BAD = [
    # --- files that used to load silently
    Bad("nan-tensor", _tensors(_nan), (r"NaN or inf", r"q_proj\.lora_A")),
    Bad("inf-tensor", _tensors(_inf), (r"NaN or inf", r"lora_B")),
    Bad("integer-tensors", _tensors(_integers), (r"not floating point", r"int32")),
    Bad(
        "seq-cls-adapter-into-causal-lm",
        _config(task_type="SEQ_CLS"),
        (r"`task_type` 'SEQ_CLS'", r"LlamaForCausalLM", r"CAUSAL_LM"),
        error=AdapterMismatchError,
    ),
    Bad(
        "lora-b-missing",
        _tensors(_drop("layers.0.self_attn.q_proj.lora_B.weight")),
        (r"missing", r"layers\.0\.self_attn\.q_proj\.lora_B"),
    ),
    Bad(
        "dora-magnitude-missing",
        _tensors(_drop("layers.1.self_attn.q_proj.lora_magnitude_vector")),
        (r"missing", r"layers\.1\.self_attn\.q_proj\.lora_magnitude_vector"),
        source="dora",
    ),
    Bad("use-dora-without-magnitudes", _config(use_dora=True), (r"missing", r"lora_magnitude_vector")),
    Bad(
        "tensors-for-a-module-the-config-does-not-adapt",
        _config(target_modules=["q_proj"]),
        (r"belong to no module the config adapts", r"v_proj"),
    ),
    Bad(
        "base-weight-that-differs",
        _tensors(_other_norm),
        (r"overwrite", r"`model\.norm\.weight`"),
        error=AdapterMismatchError,
    ),
    Bad("kasa-truncates-the-base", _config(kasa_config={}), (r"`kasa_config`", r"unload cannot undo")),
    Bad(
        "layer-replication",
        _config(layer_replication=[[0, 2], [0, 2]]),
        (r"`layer_replication`", r"rebuilds"),
    ),
    # --- files that used to fail with a raw exception
    Bad("config-is-a-json-list", _raw_config(b"[1, 2]"), (r"adapter_config\.json", r"JSON list")),
    Bad("config-not-utf8", _raw_config(b'{"peft_type": "LORA", "r": 4, "x": "\xff"}'), (r"not UTF-8",)),
    Bad("config-is-a-directory", _config_is_a_directory, (r"adapter_config\.json is a directory",)),
    Bad("r-differs-from-tensors", _config(r=8), (r"rank 4", r"r=8")),
    Bad(
        "target-modules-the-model-lacks",
        _config(target_modules=["qproj"]),
        (r"`target_modules` \['qproj'\]", r"[Dd]id you mean `q_proj`"),
        error=AdapterMismatchError,
    ),
    Bad("r-not-a-number", _config(r="abc"), (r"`r` must be a whole number", r"'abc'")),
    Bad("alpha-not-a-number", _config(lora_alpha="x"), (r"`lora_alpha` must be a finite number", r"'x'")),
    Bad(
        "modules-to-save-without-weights",
        _config(modules_to_save=["lm_head"]),
        (r"`modules_to_save`", r"no weights for `lm_head\.weight`"),
    ),
    Bad(
        "head-weights-missing",
        _tensors(lambda t: {k: v for k, v in t.items() if "classifier" not in k}),
        (r"`modules_to_save`", r"classifier\.weight"),
        source="bert",
        model="bert",
    ),
    Bad(
        "pickle-that-runs-code",
        _malicious_bin,
        (r"adapter_model\.bin", r"could run code", r"safetensors"),
        forbid=(r"weights_only",),
    ),
]


def _fresh(kind: str, adapted: bool) -> nn.Module:
    arch = "bert" if kind == "bert" else "llama"
    if not adapted:
        return tiny_model(arch)
    targets = "query,value" if arch == "bert" else "q_proj,v_proj"
    return jl.inject(tiny_model(arch), r=2, targets=targets, name="chat")


@pytest.mark.parametrize("adapted", [False, True], ids=["into-base", "beside-an-adapter"])
@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_adapter_is_refused_in_one_line(case: Bad, adapted: bool, library, tmp_path):
    path = _copy(library, tmp_path, case.source)
    case.prepare(path)
    model = _fresh(case.model, adapted)
    before = model_snapshot(model)
    files = tree_snapshot(tmp_path)

    with pytest.raises(case.error) as excinfo:
        jl.load(model, path, name="new")

    assert_model_unchanged(before, model)
    assert tree_snapshot(tmp_path) == files  # nothing written: no code ran, no leftovers
    message = str(excinfo.value)
    problems = ["spans several lines"] if "\n" in message else []
    if f"`path` {str(path)!r}" not in message:
        problems.append("does not name `path` and its value")
    problems += [f"does not match {p!r}" for p in case.match if not re.search(p, message)]
    problems += [f"matches forbidden {p!r}" for p in case.forbid if re.search(p, message)]
    assert not problems, f"{type(excinfo.value).__name__}: {message}\n  -> " + "; ".join(problems)


# ----------------------------------------------------------------------------------------------- D: Hub ids


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Callable[[str, Path], Path]:
    """An empty Hub cache, offline; ``put(repo_id, adapter_dir)`` lays an adapter into it as a download would."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo_id: str, adapter: Path) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(adapter, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return snapshot

    return put


def test_hub_id_loads_from_the_cache_offline(library, hub_cache):
    hub_cache("user/adapter", library / "plain")
    loaded = jl.load(tiny_model("llama"), "user/adapter")
    assert torch.allclose(_logits(loaded), _logits(jl.load(tiny_model("llama"), library / "plain")))
    assert loaded.peft_config["default"].r == 4


def test_hub_id_offline_and_not_cached_says_so(library, hub_cache):
    model = tiny_model("llama")
    before = model_snapshot(model)
    with pytest.raises(UsageError) as excinfo:
        jl.load(model, "user/missing")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "`path` 'user/missing'" in message
    assert "not in the local Hub cache" in message and "HF_HUB_OFFLINE" in message
    assert_model_unchanged(before, model)


def test_local_directory_wins_over_a_hub_id(library, hub_cache, tmp_path, monkeypatch):
    hub_cache("user/adapter", library / "plain")  # r=4
    monkeypatch.chdir(tmp_path)
    jl.save(jl.inject(tiny_model("llama"), r=2, targets="q_proj"), Path("user") / "adapter")
    loaded = jl.load(tiny_model("llama"), "user/adapter")
    assert loaded.peft_config["default"].r == 2


def test_hub_adapter_gets_the_same_checks(library, hub_cache, tmp_path):
    pissa = _copy(library, tmp_path, to="pissa")
    _edit_config(pissa, init_lora_weights="pissa")
    hub_cache("user/pissa", pissa)
    base = tiny_model("llama")
    before = _base_state(base)
    _assert_bit_identical(before, jl.unload(jl.load(base, "user/pissa")))

    broken = _copy(library, tmp_path, to="broken")
    _edit_tensors(broken, _nan)
    hub_cache("user/broken", broken)
    model = tiny_model("llama")
    snapshot = model_snapshot(model)
    with pytest.raises(UsageError, match=r"`path` 'user/broken'.*NaN or inf"):
        jl.load(model, "user/broken")
    assert_model_unchanged(snapshot, model)
