"""``%lora generate`` (every prompt through several adapters in one batch) and ``%lora load --hotswap`` in a real
IPython shell."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from shell_cells import run, usage_error

import jupyter_lora as jl
from jupyter_lora.magics import parse as p
from jupyter_lora.testing import tiny_inputs, tiny_model, tiny_tokenizer


def adapted(ip):
    model = tiny_model("llama", vocab_size=98, max_position_embeddings=256)
    for k, name in enumerate(("poems", "code")):
        model = jl.inject(model, name=name, r=4, targets="all-linear")
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    ip.user_ns["model"] = model
    ip.user_ns["tok"] = tiny_tokenizer()
    return model


def test_parse_generate():
    cmd = p.parse(
        'generate model --adapters poems,base "Once upon" "Hi there" --max-new-tokens 5 --tokenizer tok'
    )
    assert cmd == p.Generate("model", ("Once upon", "Hi there"), ("poems", "base"), "tok", 5)
    assert p.parse("generate model", "first prompt\n\nsecond\n") == p.Generate(
        "model", ("first prompt", "second")
    )
    assert p.parse("load model adapters/x --name a --hotswap") == p.Load("model", "adapters/x", "a", True)
    assert p.parse("load model adapters/x") == p.Load("model", "adapters/x", "default", False)
    with pytest.raises(jl.UsageError, match="give one or more prompts"):
        p.parse("generate model --adapters a,b")
    with pytest.raises(jl.UsageError, match="names no adapter"):
        p.parse('generate model --adapters "" "hi"')


def test_generate_shows_prompts_by_adapters(ip):
    model = adapted(ip)
    before = model_snapshot(model)
    got = run(ip, '%lora generate model --adapters poems,code,base --max-new-tokens 6 "Hello" "The cat"')
    assert isinstance(got, jl.Generations)
    direct = jl.generate(model, ["Hello", "The cat"], ["poems", "code", "base"], tokenizer=tiny_tokenizer(),
                         max_new_tokens=6)  # fmt: skip
    assert got.rows == direct.rows
    html = ip.display_formatter.formatters["text/html"]
    enabled, html.enabled = html.enabled, True  # as in a Jupyter kernel (this terminal shell turns it off)
    try:
        data = ip.display_formatter.format(got)[0]
    finally:
        html.enabled = enabled
    assert data["text/plain"].splitlines()[1].split() == [
        "prompt",
        "adapter",
        "'poems'",
        "adapter",
        "'code'",
        "base",
    ]
    assert "<th>base</th>" in data["text/html"]
    body = run(ip, "%%lora generate model --adapters poems,code,base --max-new-tokens 6\nHello\nThe cat\n")
    assert body.rows == direct.rows
    default = run(ip, '%lora generate model "Hello"')  # the active adapter, %config max_new_tokens
    assert default.adapters == (model.active_adapter,) and default.rows[0].new_tokens <= 40
    assert_model_unchanged(before, model)
    assert "%lora generate MODEL" in run(ip, "%lora help").data


def test_generate_mistakes_are_one_line(ip, capsys):
    adapted(ip)
    before = model_snapshot(ip.user_ns["model"])
    message = usage_error(ip, capsys, '%lora generate model --adapters poem,base "hi"')
    assert "Did you mean `poems`?" in message
    ip.user_ns["plain"] = tiny_model("llama")
    assert "this model holds none" in usage_error(ip, capsys, '%lora generate plain "hi"')
    assert "no variable `modle`" in usage_error(ip, capsys, '%lora generate modle "hi"')
    assert_model_unchanged(before, ip.user_ns["model"])


def test_load_hotswap(ip, capsys, tmp_path):
    model = adapted(ip)
    donor = jl.inject(tiny_model("llama", vocab_size=98, max_position_embeddings=256), name="x", r=4,
                      targets="all-linear")  # fmt: skip
    with torch.no_grad():
        for pname, param in donor.named_parameters():
            if "lora_B" in pname:
                param.fill_(0.01)
    path = jl.save(donor, tmp_path / "donor")
    ids = [id(m) for m in model.modules()]
    run(ip, f"%lora load model {path} --name poems --hotswap")
    assert ip.user_ns["model"] is model and [id(m) for m in model.modules()] == ids
    inputs = tiny_inputs(model)
    jl.use(model, "poems")
    expected = jl.load(tiny_model("llama", vocab_size=98, max_position_embeddings=256), path, name="poems")
    torch.testing.assert_close(model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)

    small = jl.inject(tiny_model("llama", vocab_size=98, max_position_embeddings=256), name="x", r=2,
                      targets="all-linear")  # fmt: skip
    before = model_snapshot(model)
    message = usage_error(
        ip, capsys, f"%lora load model {jl.save(small, tmp_path / 'small')} --name poems --hotswap"
    )
    assert "the rank differs" in message and "r=4 in 'poems' and r=2 in the file" in message
    assert_model_unchanged(before, model)


@pytest.mark.parametrize("written", ["a, b", "a ,b", "a , b", "a,b"])
def test_a_space_in_the_adapter_list_does_not_make_a_prompt(written):
    from jupyter_lora.magics import parse as p

    command = p.parse(f'generate model --adapters {written} "p1"', None)
    assert command.adapters == ("a", "b") and command.prompts == ("p1",)
