"""``%lora`` / ``%%lora`` in a real IPython shell with the extension loaded, cells run the way a notebook runs
them (``run_cell``): what ends up in the user's variables, what is shown, and that a mistake is one line of
``UsageError`` that changes nothing.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.display import Pretty
from model_state import assert_model_unchanged, model_snapshot
from peft import PeftModel  # imported up front: its first import may print backend notices
from shell_cells import run, usage_error
from torch import nn

import jupyter_lora as jl
from jupyter_lora.core.train import make_train_config
from jupyter_lora.magics.lora import LoraMagics
from jupyter_lora.testing import tiny_config, tiny_inputs, tiny_model, tiny_tokenizer

# ----------------------------------------------------------------------------------------------- helpers


def call_magic(ip, source: str) -> Any:
    """Call the magic directly (exceptions propagate): ``%lora LINE`` or ``%%lora LINE\\nBODY``."""
    if source.startswith("%%lora"):
        line, _, cell = source[len("%%lora") :].partition("\n")
        return ip.run_cell_magic("lora", line.strip(), cell)
    return ip.run_line_magic("lora", source[len("%lora") :].strip())


def lora_paths(model: nn.Module, name: str | None = None) -> list[str]:
    """Paths (relative to the base model) of the modules holding LoRA weights (of adapter ``name``)."""
    return sorted(
        path.removeprefix("base_model.model.")
        for path, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and (name in m.lora_A if name else len(m.lora_A))
    )


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_lora_b(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give it values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def namespace_snapshot(ip) -> dict[str, int]:
    """User variables -> identity of the object each holds."""
    return {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_") and k not in ip.user_ns_hidden}


def shown(ip, obj: Any) -> tuple[str, str]:
    """What the shell sends for ``obj`` as a cell's result: (plain text, HTML) through its display formatters,
    with HTML on as in a Jupyter kernel (a terminal shell, like this one, turns it off)."""
    html = ip.display_formatter.formatters["text/html"]
    enabled, html.enabled = html.enabled, True
    try:
        data, _ = ip.display_formatter.format(obj)
    finally:
        html.enabled = enabled
    return data["text/plain"], data.get("text/html", "")


def assert_aligned(text: str, header: str, n_rows: int | None = None) -> None:
    """The plain-text table whose header line starts with ``header`` is aligned: a dash rule under the header,
    and every row (``n_rows``, or up to and including the ``total`` row) keeps the gaps between columns blank."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header))
    rule = lines[i + 1]
    assert re.fullmatch(r"-+( +-+)+", rule), rule
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    if n_rows is None:
        n_rows = next(k for k, line in enumerate(lines[i + 2 :], 1) if line.startswith("total"))
    rows = [lines[i], *lines[i + 2 : i + 2 + n_rows]]
    assert len(rows) == n_rows + 1
    for row in rows:
        assert len(row) <= len(rule), f"{row!r} overruns the rule {rule!r}"
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert row[end:start].strip() == "", f"{row!r} is not aligned with {rule!r}"
        assert row[: spans[0][1]].strip(), f"{row!r} has an empty first column"


# ----------------------------------------------------------------------------------------------- extension


def test_load_ext_is_cheap():
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'jupyter_lora')\n"
        "assert ip.find_line_magic('lora') is not None and ip.find_cell_magic('lora') is not None\n"
        "ip.run_line_magic('lora', 'help')\n"
        "try:\n"
        "    ip.run_line_magic('lora', 'stauts model')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-3:] == ["UsageError", "[]", ""], out.stdout + out.stderr
    # one line says it is loaded: version, device (found without torch), where help is
    first = out.stdout.splitlines()[0]
    assert first.startswith(f"jupyter_lora {jl.__version__} · ") and first.endswith(
        "%lora help lists the commands"
    )
    assert "GPU" in first


def test_loading_twice_is_harmless(ip, capsys):
    first = ip.find_line_magic("lora").__self__
    assert isinstance(first, LoraMagics)
    run(ip, "%load_ext jupyter_lora")
    jl.load_ipython_extension(ip)
    jl.load_ipython_extension(ip)
    assert ip.find_line_magic("lora").__self__ is first
    assert ip.find_cell_magic("lora").__self__ is first
    instances = [c for c in ip.configurables if isinstance(c, LoraMagics)]
    assert instances == [first], f"{len(instances)} LoraMagics entries in shell.configurables"
    assert isinstance(run(ip, "%lora help"), Pretty)
    assert "%lora help lists the commands" not in capsys.readouterr().out, (
        "loading again prints no second line"
    )


def test_unload_removes_everything_and_load_again_works(ip):
    ip.user_ns["model"] = tiny_model("llama")
    run(ip, "%%lora model\nr: 4\ntargets: q_proj")
    run(ip, "%unload_ext jupyter_lora")
    assert ip.find_line_magic("lora") is None
    assert ip.find_cell_magic("lora") is None
    assert not any(isinstance(c, LoraMagics) for c in ip.configurables)
    assert "LoraMagics" not in ip.magics_manager.registry
    assert not ip.run_cell("%lora help").success
    # the user's variables are theirs: unloading the extension does not touch them
    assert isinstance(ip.user_ns["model"], PeftModel)

    run(ip, "%load_ext jupyter_lora")
    assert isinstance(ip.find_line_magic("lora").__self__, LoraMagics)
    assert [type(c) for c in ip.configurables].count(LoraMagics) >= 1
    status = run(ip, "%lora status model")
    assert [a.name for a in status.adapters] == ["default"]


# ----------------------------------------------------------------------------------------------- %%lora MODEL


def test_inject_cell_puts_the_adapted_model_in_the_variable(ip):
    base = tiny_model("llama")
    expected = jl.plan(tiny_model("llama"), r=8, targets="attention")
    ip.user_ns["model"] = base
    summary = run(ip, "%%lora model\nr: 8\ntargets: attention\n")

    model = ip.user_ns["model"]
    assert isinstance(model, PeftModel)
    assert model.base_model.model is base
    assert list(model.peft_config) == ["default"]
    assert model.peft_config["default"].r == 8
    assert model.peft_config["default"].lora_alpha == 16
    assert trainable(model) == expected.trainable_params
    assert jl.status(model).trainable_params == expected.trainable_params
    assert lora_paths(model) == sorted(expected.targets)

    text = repr(summary)
    assert text.startswith("`model` now holds the adapted model")
    assert "trainable" in text and f"{expected.trainable_params:,}" in text
    assert re.search(r"^module +kind +count +shape +params$", text, re.M), text
    for name, shape in (("q_proj", "32→32"), ("k_proj", "32→16"), ("v_proj", "32→16"), ("o_proj", "32→32")):
        assert re.search(rf"^{name} +linear +2 +{shape} ", text, re.M), text
    assert_aligned(text, "module", n_rows=4)
    html = summary._repr_html_()
    assert "<table" in html and "q_proj" in html and "trainable" in html


def test_inject_line_magic_uses_the_defaults(ip):
    ip.user_ns["model"] = tiny_model("llama")
    run(ip, "%lora model")
    model = ip.user_ns["model"]
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].r == 16


def test_dry_run_leaves_the_variable_untouched(ip):
    base = tiny_model("llama")
    ip.user_ns["model"] = base
    before = model_snapshot(base)
    summary = run(ip, "%%lora model --dry-run\nr: 8\ntargets: attention")
    assert ip.user_ns["model"] is base
    assert lora_paths(base) == []
    assert_model_unchanged(before, base)
    assert "dry run" in repr(summary) and "unchanged" in repr(summary)
    assert summary.plan.trainable_params == jl.plan(base, r=8, targets="attention").trainable_params

    # on an adapted model too: the adapter stays as it is
    run(ip, "%%lora model\nr: 8\ntargets: q_proj")
    adapted = ip.user_ns["model"]
    before = model_snapshot(adapted)
    run(ip, "%%lora model --dry-run\nr: 2\ntargets: mlp")
    assert ip.user_ns["model"] is adapted
    assert_model_unchanged(before, adapted)


def test_rerunning_the_cell_replaces_the_adapter(ip):
    base = tiny_model("llama")
    reference = tiny_model("llama")  # same seed: the same weights, never adapted
    inputs = tiny_inputs(base)
    base_out = logits(reference, inputs)
    ip.user_ns["model"] = base

    run(ip, "%%lora model\nr: 8\ntargets: attention\n")
    randomize_lora_b(ip.user_ns["model"])
    summary = run(ip, "%%lora model\nr: 4\ntargets: mlp\n")

    model = ip.user_ns["model"]
    assert isinstance(model, PeftModel)
    assert list(model.peft_config) == ["default"]
    assert model.peft_config["default"].r == 4
    assert sum(isinstance(m, PeftModel) for m in model.modules()) == 1, "a PeftModel inside a PeftModel"
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"
    new_plan = jl.plan(reference, r=4, targets="mlp")
    assert lora_paths(model) == sorted(new_plan.targets)
    assert len(lora_paths(model)) == 6
    assert all(p.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for p in lora_paths(model))
    assert trainable(model) == new_plan.trainable_params
    assert all(
        m.lora_A["default"].weight.shape[0] == 4 for m in model.modules() if hasattr(m, "lora_A") and m.lora_A
    )
    assert "replaces the existing adapter 'default'" in repr(summary)
    # the base weights are intact and the fresh adapter starts as the identity
    torch.testing.assert_close(logits(model, inputs), base_out)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base_out)

    # the same cell again: the same state, still one wrap and one adapter
    run(ip, "%%lora model\nr: 4\ntargets: mlp\n")
    again = ip.user_ns["model"]
    assert list(again.peft_config) == ["default"]
    assert sum(isinstance(m, PeftModel) for m in again.modules()) == 1
    assert lora_paths(again) == sorted(new_plan.targets)
    assert trainable(again) == new_plan.trainable_params


def test_name_adds_a_second_adapter_and_replace_drops_the_others(ip):
    ip.user_ns["model"] = tiny_model("llama")
    run(ip, "%%lora model\nr: 4\ntargets: q_proj")
    run(ip, "%%lora model --name second\nr: 8\ntargets: v_proj")
    model = ip.user_ns["model"]
    assert list(model.peft_config) == ["default", "second"]
    assert model.active_adapter == "second"
    assert len(lora_paths(model, "default")) == 2 and len(lora_paths(model, "second")) == 2

    run(ip, "%%lora model --name second\nr: 2\ntargets: v_proj")  # re-run: replaces `second` only
    model = ip.user_ns["model"]
    assert list(model.peft_config) == ["default", "second"]
    assert (model.peft_config["default"].r, model.peft_config["second"].r) == (4, 2)
    assert sum(isinstance(m, PeftModel) for m in model.modules()) == 1

    run(ip, "%%lora model --name third --replace\nr: 2\ntargets: o_proj")
    model = ip.user_ns["model"]
    assert list(model.peft_config) == ["third"]
    assert [a.name for a in jl.status(model).adapters] == ["third"]
    assert lora_paths(model) == lora_paths(model, "third")
    assert [p.rsplit(".", 1)[-1] for p in lora_paths(model)] == ["o_proj", "o_proj"]
    assert {k for m in model.modules() if hasattr(m, "lora_A") for k in m.lora_A} == {"third"}


def test_config_sets_the_defaults_of_a_bare_cell(ip):
    ip.user_ns["model"] = tiny_model("llama")
    run(ip, "%config LoraMagics.default_r = 4")
    run(ip, "%config LoraMagics.default_targets = 'mlp'")
    run(ip, "%%lora model\n# all defaults\n")
    config = ip.user_ns["model"].peft_config["default"]
    assert config.r == 4
    assert config.lora_alpha == 8
    assert set(config.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    # a setting in the cell wins over the default
    run(ip, "%%lora model\nr: 2")
    assert ip.user_ns["model"].peft_config["default"].r == 2
    assert set(ip.user_ns["model"].peft_config["default"].target_modules) == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }


# ----------------------------------------------------------------------------------------------- subcommands


def test_status_with_and_without_a_model(ip):
    ip.user_ns["model"] = tiny_model("llama")
    ip.user_ns["other"] = tiny_model("llama", seed=1)  # a plain model next to the adapted one
    run(ip, "%%lora model\nr: 4\ntargets: q_proj")
    named = run(ip, "%lora status model")
    found = run(ip, "%lora status")
    assert isinstance(named, jl.AdapterStatus)
    assert found == named
    assert [(a.name, a.r, a.modules) for a in named.adapters] == [("default", 4, 2)]
    assert named.active == ("default",) and named.enabled is True
    assert named.trainable_params == trainable(ip.user_ns["model"])
    text, html = shown(ip, named)
    assert_aligned(text, "adapter", n_rows=1)
    assert "<table" in html

    plain = run(ip, "%lora status other")
    assert plain.adapters == ()
    assert "No LoRA adapter" in shown(ip, plain)[0]


def test_estimate_model_config_and_path(ip, tmp_path):
    model = tiny_model("llama")
    config = tiny_config("llama")
    config.save_pretrained(tmp_path / "cfg")
    ip.user_ns.update(model=model, cfg=config)

    default = run(ip, "%lora estimate model")
    assert isinstance(default, jl.MemoryEstimate)
    trained = make_train_config()  # an estimate describes the run `%%lora train` would start
    assert (default.seq, default.batch, default.ckpt, default.optim) == (
        trained.seq,
        trained.batch,
        False,
        "adamw",
    )
    assert default.trainable_params == jl.plan(model, r=16).trainable_params
    text, html = shown(ip, default)
    assert_aligned(text, "component")
    assert "<table" in html

    small = run(ip, "%lora estimate model --seq 128 --batch 2 --ckpt")
    assert (small.seq, small.batch, small.ckpt) == (128, 2, True)
    assert small.total_bytes < default.total_bytes

    from_config = run(ip, "%lora estimate cfg --seq 128 --batch 2 --ckpt")
    from_path = run(ip, f"%lora estimate {tmp_path / 'cfg'} --seq 128 --batch 2 --ckpt")
    assert (from_config.seq, from_config.batch, from_config.ckpt) == (128, 2, True)
    assert from_path.breakdown == from_config.breakdown
    assert from_path.trainable_params == from_config.trainable_params == default.trainable_params

    body = run(ip, "%%lora estimate model\nseq: 64\nr: 4\ntargets: mlp")
    assert body.seq == 64
    assert body.trainable_params == jl.plan(model, r=4, targets="mlp").trainable_params

    run(ip, "%config LoraMagics.default_seq = 256")
    assert run(ip, "%lora estimate model").seq == 256

    # an adapted model is estimated with the adapter it holds
    run(ip, "%%lora model\nr: 2\ntargets: q_proj")
    held = run(ip, "%lora estimate model")
    assert held.trainable_params == trainable(ip.user_ns["model"])


def test_merge_gives_the_plain_model_with_the_adapters_outputs(ip):
    ip.user_ns["model"] = tiny_model("llama")
    inputs = tiny_inputs(ip.user_ns["model"])
    base_out = logits(ip.user_ns["model"], inputs)
    run(ip, "%%lora model\nr: 8\ntargets: attention")
    randomize_lora_b(ip.user_ns["model"])
    adapted_out = logits(ip.user_ns["model"], inputs)
    assert not torch.allclose(adapted_out, base_out, atol=1e-3)

    note = run(ip, "%lora merge model")
    merged = ip.user_ns["model"]
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not isinstance(merged, PeftModel)
    assert lora_paths(merged) == []
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, inputs), adapted_out, atol=1e-5, rtol=1e-4)
    assert "`model`" in repr(note) and "merged" in repr(note) and "LlamaForCausalLM" in repr(note)


def test_unload_gives_back_the_base_model(ip):
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = tiny_inputs(base)
    base_out = logits(base, inputs)
    ip.user_ns["model"] = base
    run(ip, "%%lora model\nr: 8\ntargets: all-linear")
    randomize_lora_b(ip.user_ns["model"])
    assert not torch.allclose(logits(ip.user_ns["model"], inputs), base_out, atol=1e-3)

    note = run(ip, "%lora unload model")
    model = ip.user_ns["model"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert lora_paths(model) == []
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, inputs), base_out)
    assert "base" in repr(note)


def test_disable_and_enable_switch_the_outputs(ip):
    ip.user_ns["model"] = tiny_model("llama")
    inputs = tiny_inputs(ip.user_ns["model"])
    base_out = logits(ip.user_ns["model"], inputs)
    run(ip, "%%lora model\nr: 8\ntargets: attention")
    model = ip.user_ns["model"]
    randomize_lora_b(model)
    adapted_out = logits(model, inputs)

    off = run(ip, "%lora disable model")
    assert off.enabled is False
    assert ip.user_ns["model"] is model
    torch.testing.assert_close(logits(model, inputs), base_out)

    on = run(ip, "%lora enable model")
    assert on.enabled is True
    assert ip.user_ns["model"] is model
    torch.testing.assert_close(logits(model, inputs), adapted_out)


def test_use_and_delete_with_two_adapters(ip):
    ip.user_ns["model"] = tiny_model("llama")
    inputs = tiny_inputs(ip.user_ns["model"])
    run(ip, "%%lora model\nr: 4\ntargets: q_proj")
    run(ip, "%%lora model --name second\nr: 8\ntargets: v_proj")
    model = ip.user_ns["model"]
    randomize_lora_b(model, "default", seed=1)
    randomize_lora_b(model, "second", seed=2)
    second_out = logits(model, inputs)

    status = run(ip, "%lora use model default")
    assert status.active == ("default",)
    assert model.active_adapter == "default"
    default_out = logits(model, inputs)
    assert not torch.allclose(default_out, second_out, atol=1e-3)
    run(ip, "%lora use model second")
    torch.testing.assert_close(logits(model, inputs), second_out)

    status = run(ip, "%lora delete model second")
    assert list(model.peft_config) == ["default"]
    assert [a.name for a in status.adapters] == ["default"]
    assert ip.user_ns["model"] is model
    torch.testing.assert_close(logits(model, inputs), default_out)


def test_save_and_load(ip, tmp_path, capsys):
    ip.user_ns["model"] = tiny_model("llama")
    inputs = tiny_inputs(ip.user_ns["model"])
    run(ip, "%%lora model\nr: 8\ntargets: attention")
    randomize_lora_b(ip.user_ns["model"])
    adapted_out = logits(ip.user_ns["model"], inputs)

    path = tmp_path / "run 1"
    note = run(ip, f'%lora save model "{path}"')
    assert (path / "adapter_config.json").is_file()
    assert (path / "adapter_model.safetensors").is_file()
    assert str(path) in repr(note) and "adapter" in repr(note)

    ip.user_ns["fresh"] = tiny_model("llama")  # same seed: the same base weights
    status = run(ip, f'%lora load fresh "{path}"')
    fresh = ip.user_ns["fresh"]
    assert isinstance(fresh, PeftModel)
    assert [a.name for a in status.adapters] == ["default"]
    torch.testing.assert_close(logits(fresh, inputs), adapted_out)

    run(ip, f'%lora load fresh "{path}" --name again')
    assert list(ip.user_ns["fresh"].peft_config) == ["default", "again"]
    assert ip.user_ns["fresh"].active_adapter == "again"

    merged_path = tmp_path / "merged"
    note = run(ip, f"%lora save model {merged_path} --merged")
    assert (merged_path / "config.json").is_file()
    assert (merged_path / "model.safetensors").is_file()
    assert "merged model" in repr(note)
    assert isinstance(ip.user_ns["model"], PeftModel)  # the live model stays adapted

    # an adapter over the merged model is refused (it would replace it) unless --overwrite says so
    message = usage_error(ip, capsys, f"%lora save model {merged_path}")
    assert (
        "merged model" in message
        and "--overwrite" in message
        and (merged_path / "model.safetensors").is_file()
    )
    with pytest.warns(
        UserWarning, match=r"replaced in .*: config.json, generation_config.json, model.safetensors"
    ):
        run(ip, f"%lora save model {merged_path} --overwrite")
    assert (merged_path / "adapter_config.json").is_file()
    torch.testing.assert_close(logits(ip.user_ns["model"], inputs), adapted_out)


def test_compare_generation(ip):
    ip.user_ns["model"] = tiny_model("llama")
    ip.user_ns["tok"] = tiny_tokenizer()
    run(ip, "%%lora model\nr: 8\ntargets: all-linear")
    randomize_lora_b(ip.user_ns["model"])
    before = model_snapshot(ip.user_ns["model"])
    modes = [m.training for m in ip.user_ns["model"].modules()]

    named = run(ip, '%lora compare model "Hello" --tokenizer tok --max-new-tokens 5')
    assert isinstance(named, jl.Comparison)
    assert named.kind == "generation" and named.prompt == "Hello" and named.adapter_name == "default"
    assert isinstance(named.base, str) and isinstance(named.adapter, str)
    text, html = shown(ip, named)
    assert "prompt: Hello" in text
    assert re.search(r"^base: ", text, re.M) and re.search(r"^adapter 'default': ", text, re.M)
    assert "<table" in html and "<th>base</th>" in html and "<th>adapter 'default'</th>" in html

    assert run(ip, '%lora compare model "Hello" --max-new-tokens 5') == named  # tokenizer found by type
    assert run(ip, "%%lora compare model --max-new-tokens 5\nHello\n") == named  # prompt in the body
    assert_model_unchanged(before, ip.user_ns["model"])
    after = [m.training for m in ip.user_ns["model"].modules()]
    assert after == modes, (
        f"compare changed the train/eval mode of {sum(a != b for a, b in zip(after, modes, strict=True))} modules"
    )


def test_compare_classifier_shows_label_probabilities(ip):
    ip.user_ns["clf"] = tiny_model("bert")
    ip.user_ns["tok"] = tiny_tokenizer()
    run(ip, "%%lora clf\nr: 4\ntargets: attention")
    randomize_lora_b(ip.user_ns["clf"])
    comparison = run(ip, '%lora compare clf "hello there"')
    assert comparison.kind == "classification"
    assert len(comparison.labels) == 3
    assert sum(comparison.base_probs) == pytest.approx(1.0, abs=1e-5)
    assert sum(comparison.adapter_probs) == pytest.approx(1.0, abs=1e-5)
    assert comparison.base_probs != comparison.adapter_probs
    text, html = shown(ip, comparison)
    assert re.search(r"^label +base +adapter 'default'$", text, re.M), text
    assert_aligned(text, "label", n_rows=3)
    assert "<table" in html and all(label in html for label in comparison.labels)


def test_help(ip, capsys):
    shown = run(ip, "%lora help")
    assert isinstance(shown, Pretty)
    assert "%%lora MODEL" in shown.data
    for sub in ("status", "estimate", "merge", "unload", "enable", "disable", "use", "delete", "save", "load",
                "compare"):  # fmt: skip
        assert f"%lora {sub}" in shown.data or f"| {sub} MODEL" in shown.data, sub
    for spelling in ("?", "--help", "-h"):
        assert ip.run_line_magic("lora", spelling).data == shown.data

    doc = ip.find_line_magic("lora").__doc__ or ""
    assert "%%lora MODEL" in doc and "%lora compare" in doc and "%lora status" in doc

    capsys.readouterr()
    assert ip.run_cell("%lora?").success
    out = capsys.readouterr().out
    assert "%%lora MODEL" in out and "%lora estimate" in out


# ----------------------------------------------------------------------------------------------- mistakes

_SETUP = {
    "plain": "from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')\nx = 3\n",
    "adapted": "from jupyter_lora.testing import tiny_model\nmodel = tiny_model('llama')\nx = 3\n%lora model",
    "adapted-two-tokenizers": "from jupyter_lora.testing import tiny_model, tiny_tokenizer\n"
    "model = tiny_model('llama')\nx = 3\ntok = tiny_tokenizer()\ntok2 = tiny_tokenizer()\n%lora model",
}

MISTAKES: list[tuple[str, str, str, str]] = [
    (
        "unknown-subcommand",
        "plain",
        "%lora stauts model",
        r"unknown subcommand 'stauts'.*Did you mean `status`",
    ),
    (
        "unknown-yaml-key",
        "plain",
        "%%lora model\nr: 8\nalhpa: 16",
        r"unknown setting `alhpa`.*Did you mean `alpha`",
    ),
    ("unknown-yaml-key-adapted", "adapted", "%%lora model\nalhpa: 16", r"unknown setting `alhpa`.*`alpha`"),
    ("yaml-syntax-error", "plain", "%%lora model\nr: 8\n  alpha: 3", r"not valid YAML on line 2\b"),
    ("yaml-list", "plain", "%%lora model\n- r\n- 8", r"must be `key: value` lines"),
    ("variable-not-found", "plain", "%lora status modle", r"no variable `modle`.*Did you mean `model`"),
    (
        "inject-variable-not-found",
        "plain",
        "%%lora modle\nr: 8",
        r"no variable `modle`.*Did you mean `model`",
    ),
    ("merge-variable-not-found", "plain", "%lora merge modle", r"no variable `modle`.*Did you mean `model`"),
    (
        "not-a-model",
        "plain",
        "%lora status x",
        r"`x` is of type int, not a model.*Model variables here: model",
    ),
    ("inject-not-a-model", "plain", "%%lora x\nr: 8", r"`x` is of type int, not a model"),
    ("r-not-a-number", "plain", "%%lora model\nr: eight", r"`r` must be a whole number.*'eight'"),
    ("r-not-a-number-adapted", "adapted", "%%lora model\nr: eight", r"`r` must be a whole number.*'eight'"),
    ("dropout-out-of-range", "plain", "%%lora model\ndropout: 2", r"`dropout` must be in \[0, 1\).*2"),
    (
        "misspelled-target",
        "plain",
        "%%lora model\ntargets: q_prj",
        r"`targets` 'q_prj'.*Did you mean `q_proj`",
    ),
    (
        "misspelled-target-adapted",
        "adapted",
        "%%lora model\ntargets: q_prj",
        r"'q_prj'.*Did you mean `q_proj`",
    ),
    ("merge-without-adapter", "plain", "%lora merge model", r"Cannot merge: this model has no LoRA adapter"),
    ("unload-without-adapter", "plain", "%lora unload model", r"Cannot unload: .*no LoRA adapter"),
    (
        "save-without-adapter",
        "plain",
        "%lora save model /tmp/never-written",
        r"Cannot save: .*no LoRA adapter",
    ),
    ("status-finds-no-adapted-model", "plain", "%lora status", r"no variable holds an adapted model"),
    ("use-unknown-adapter", "adapted", "%lora use model defualt", r"'defualt'.*Did you mean `default`"),
    ("delete-only-adapter", "adapted", "%lora delete model default", r"only adapter.*unload"),
    ("compare-without-tokenizer", "adapted", '%lora compare model "hi"', r"no tokenizer in the notebook"),
    (
        "compare-tokenizer-not-found",
        "adapted",
        '%lora compare model "hi" --tokenizer tokk',
        r"no variable `tokk`",
    ),
    (
        "compare-two-tokenizers",
        "adapted-two-tokenizers",
        "%lora compare model hi",
        r"several tokenizers.*--tokenizer",
    ),
    (
        "load-missing-path",
        "plain",
        "%lora load model /nonexistent/adapter",
        r"No saved adapter.*does not exist",
    ),
    (
        "estimate-missing-path",
        "plain",
        "%lora estimate ./no/such/dir",
        r"`source` './no/such/dir' does not exist",
    ),
    ("train-without-data", "plain", "%lora train model", r"%%lora train: the cell body needs `data:`"),
]


@pytest.mark.parametrize(
    ("setup", "source", "pattern"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_mistake_is_one_line_and_changes_nothing(ip, capsys, setup, source, pattern):
    run(ip, _SETUP[setup])
    names = namespace_snapshot(ip)
    models = {k: model_snapshot(v) for k, v in ip.user_ns.items() if isinstance(v, nn.Module)}

    with pytest.raises(UsageError, match=pattern):
        call_magic(ip, source)
    message = usage_error(ip, capsys, source)
    assert re.search(pattern, message), message

    assert namespace_snapshot(ip) == names
    for name, before in models.items():
        assert_model_unchanged(before, ip.user_ns[name])


def test_argument_errors_show_usage_without_traceback(ip, capsys):
    ip.user_ns["model"] = tiny_model("llama")
    for source, pattern in (
        ("%lora estimate model --seq 0", r"--seq: must be a positive whole number"),
        ("%lora estimate model --4bit --8bit", r"not allowed with argument --4bit"),
        ("%lora use model", r"required: name"),
        ('%lora compare model "unclosed', r"close the quotes"),
        ("%lora", r"say what to do"),
    ):
        capsys.readouterr()
        result = ip.run_cell(source)
        captured = capsys.readouterr()
        assert isinstance(result.error_in_exec, UsageError), source
        assert re.search(pattern, str(result.error_in_exec)), str(result.error_in_exec)
        assert "Traceback" not in captured.out + captured.err
        assert captured.err.startswith("UsageError: ")


# ----------------------------------------------------------------------------------------------- rich output


def test_html_escapes_user_strings(ip, tmp_path):
    ip.user_ns["model"] = tiny_model("llama")
    ip.user_ns["tok"] = tiny_tokenizer()
    run(ip, "%%lora model\nr: 4\ntargets: q_proj")

    comparison = run(ip, '%lora compare model "<b>hi</b> & bye" --max-new-tokens 3')
    text, html = shown(ip, comparison)
    assert "&lt;b&gt;hi&lt;/b&gt; &amp; bye" in html
    assert "<b>hi</b>" not in html
    assert "prompt: <b>hi</b> & bye" in text  # plain text is shown as typed

    path = tmp_path / "a<b>&c"
    note = run(ip, f'%lora save model "{path}"')
    assert (path / "adapter_config.json").is_file()
    assert "a&lt;b&gt;&amp;c" in note._repr_html_()
    assert "a<b>" not in note._repr_html_()
    assert str(path) in repr(note)


def test_every_result_has_html_and_aligned_text(ip):
    ip.user_ns["model"] = tiny_model("llama")
    summary = run(ip, "%%lora model\nr: 4\ntargets: attention, mlp")
    status = run(ip, "%lora status model")
    estimate = run(ip, "%lora estimate model")
    texts = {}
    for obj in (summary, status, estimate):
        texts[type(obj).__name__], html = shown(ip, obj)
        assert "<table" in html and html.count("<table") == html.count("</table>"), type(obj).__name__
    assert_aligned(texts["InjectSummary"], "module", n_rows=len(summary.plan.groups()))
    assert_aligned(texts["InjectSummary"], "component")
    assert_aligned(texts["AdapterStatus"], "adapter", n_rows=1)
    assert_aligned(texts["MemoryEstimate"], "component")


def test_inject_summary_estimates_the_run_training_would_start(ip, tmp_path):
    """The memory figure after %%lora describes `%%lora train`'s run (its seq, batch, optimizer, checkpointing),
    says so, and follows the same %config defaults training does."""
    ip.user_ns["model"] = tiny_model("llama")
    summary = run(ip, "%%lora model\nr: 4")
    trained = make_train_config()
    m = summary.estimate
    assert (m.seq, m.batch, m.optim, m.ckpt) == (trained.seq, trained.batch, trained.optim, False)
    text, _ = shown(ip, summary)
    assert f"batch {trained.batch} × seq {trained.seq}" in text and "gradient checkpointing off" in text
    run(ip, "%config LoraMagics.default_seq = 128")
    run(ip, "%config LoraMagics.default_optim = 'adafactor'")
    again = run(ip, "%%lora model\nr: 4").estimate
    assert (again.seq, again.optim) == (128, "adafactor")
    ip.user_ns.update(tok=tiny_tokenizer(), texts=["the quick brown fox"] * 8)
    run(ip, "%config LoraMagics.progress = 'text'")
    run(ip, f"%%lora train model\ndata: texts\nsteps: 1\nbatch: 4\neval: 0\noutput_dir: {tmp_path}")
    started = jl.last_run(ip.user_ns["model"]).wait()
    assert (started.config.seq, started.config.optim) == (128, "adafactor")


def test_config_defaults_are_checked_none_included(ip):
    for value in ("None", "0", "'x'"):
        ip.run_cell(f"%config LoraMagics.default_r = {value}")  # %config reports the TraitError itself
    magics = next(c for c in ip.configurables if isinstance(c, LoraMagics))
    assert magics.default_r == 16
    run(ip, "%config LoraMagics.default_steps = None")  # nullable settings take None
    assert magics.default_steps is None
