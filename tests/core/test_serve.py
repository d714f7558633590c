"""Several adapters from one base: ``generate`` runs every prompt through every adapter in one mixed batch, and
each row equals what that adapter (or the base model) generates on its own; ``load(..., hotswap=True)`` replaces
an adapter's weights in place."""

from __future__ import annotations

import types

import pytest
import torch
from chat_models import TEMPLATE
from model_state import assert_model_unchanged, model_snapshot

import jupyter_lora as jl
from jupyter_lora.core import runs
from jupyter_lora.display import render_html, render_text
from jupyter_lora.testing import tiny_inputs, tiny_model, tiny_tokenizer

VOCAB = 98  # every id the model generates decodes to a character of the tiny tokenizer
ADAPTERS = ("poems", "code", "legal")
PROMPTS = ["Hello", "The cat sat on the", "Why?"]


def randomize(model, name: str, seed: int) -> None:
    """LoRA B starts at zero (the adapter changes nothing); give adapter ``name`` values that change outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def with_adapters(arch: str = "llama", names=ADAPTERS, **settings):
    overrides = {"max_position_embeddings": 256} if arch == "llama" else {}
    model = tiny_model(arch, vocab_size=VOCAB, **overrides)
    for k, name in enumerate(names):
        model = jl.inject(model, name=name, r=4, targets="all-linear", **settings)
        randomize(model, name, seed=10 + k)
    return model


def alone(model, tok, prompt: str, adapter: str, n: int, templated: bool) -> tuple[str, int]:
    """``prompt`` through ``adapter`` alone, the plain PEFT way: one prompt, no padding, set_adapter (or
    disable_adapter for the base), greedy; the reply and its token count (up to and including eos)."""
    if templated:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tok(prompt, return_tensors="pt")
    before = model.active_adapter
    try:
        with torch.no_grad():
            if adapter == "base":
                with model.disable_adapter():
                    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
            else:
                model.set_adapter(adapter)
                out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        model.set_adapter(before)
    seq2seq = model.config.is_encoder_decoder
    new = out[0, 1:] if seq2seq else out[0, enc["input_ids"].shape[1] :]
    new = new.tolist()
    count = next((k + 1 for k, t in enumerate(new) if t == tok.eos_token_id), len(new))
    return tok.decode(new[:count], skip_special_tokens=True), count


@pytest.mark.parametrize("templated", [False, True], ids=["plain", "chat-template"])
def test_mixed_batch_equals_each_adapter_alone(templated):
    model = with_adapters()
    tok = tiny_tokenizer()
    if templated:
        tok.chat_template = TEMPLATE
    before = model_snapshot(model)
    asked = [*ADAPTERS, "base"]
    got = jl.generate(model, PROMPTS, asked, tokenizer=tok, max_new_tokens=12)
    assert isinstance(got, jl.Generations)
    assert got.prompts == tuple(PROMPTS) and got.adapters == tuple(asked) and len(got) == 12
    for i, prompt in enumerate(PROMPTS):
        for a in asked:
            row = got.rows[i * len(asked) + asked.index(a)]
            assert (row.prompt, row.adapter) == (prompt, a)
            assert (row.text, row.new_tokens) == alone(model, tok, prompt, a, 12, templated), (prompt, a)
    # the adapters really differ, so equality above means each row went through its own adapter
    for i in range(len(PROMPTS)):
        assert len({got.text(i, a) for a in asked}) == len(asked)
    assert_model_unchanged(before, model)
    assert model.active_adapter == ADAPTERS[-1]


def test_default_is_the_active_adapter_and_one_prompt_may_be_text():
    model = with_adapters()
    jl.use(model, "code")
    got = jl.generate(model, "Hello", tokenizer=tiny_tokenizer(), max_new_tokens=6)
    assert got.adapters == ("code",) and got.prompts == ("Hello",)
    assert got.rows[0].text == alone(model, tiny_tokenizer(), "Hello", "code", 6, False)[0]


def test_seq2seq_mixed_batch_equals_each_adapter_alone():
    model = with_adapters("t5", names=("poems", "code"))
    tok = tiny_tokenizer()
    got = jl.generate(model, PROMPTS[:2], ["poems", "base", "code"], tokenizer=tok, max_new_tokens=8)
    for i, prompt in enumerate(PROMPTS[:2]):
        for a in ("poems", "base", "code"):
            assert (got.text(i, a), got.rows[i * 3 + ("poems", "base", "code").index(a)].new_tokens) == alone(
                model, tok, prompt, a, 8, False
            ), (prompt, a)


def test_renderings_side_by_side():
    model = with_adapters(names=("poems", "code"))
    got = jl.generate(
        model, ["Hi <b>", "Bye"], ["poems", "code", "base"], tokenizer=tiny_tokenizer(), max_new_tokens=4
    )
    text = render_text(got)
    lines = text.splitlines()
    assert "2 prompt(s) × 3 adapter(s) in one batch" in lines[0]
    assert lines[1].split() == ["prompt", "adapter", "'poems'", "adapter", "'code'", "base"]
    assert lines[3].startswith("Hi <b>") and lines[4].startswith("Bye")
    html = render_html(got)
    assert html.count("<tr>") == 3 and "<th>adapter &#x27;poems&#x27;</th>" in html and "Hi &lt;b&gt;" in html
    assert "Generations(2 prompt(s)" in repr(got)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(jl.UsageError, match="pip install pandas"):
            got.to_pandas()
    else:
        frame = got.to_pandas()
        assert list(frame.columns) == ["prompt", "adapter", "text", "new_tokens"] and len(frame) == 6


def test_a_classifier_is_refused():
    model = jl.inject(tiny_model("bert"), r=4, targets="attention")
    with pytest.raises(
        jl.UsageError, match=r"`generate` makes text .*\(BertForSequenceClassification\).*compare"
    ):
        jl.generate(model, "hi", tokenizer=tiny_tokenizer())


def _refused(model, match: str, *args, **kwargs) -> str:
    before = model_snapshot(model)
    kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(jl.UsageError, match=match) as info:
        jl.generate(model, *args, tokenizer=tiny_tokenizer(), **kwargs)
    assert "\n" not in str(info.value)
    assert_model_unchanged(before, model)
    return str(info.value)


def test_mistakes_are_one_line_and_change_nothing():
    model = with_adapters(names=("poems", "code"))
    _refused(model, r"'poem' is no adapter of this model\. Did you mean `poems`\?", "hi", ["poem", "base"])
    _refused(model, r"`prompts\[1\]` must be non-empty text", ["hi", ""])
    _refused(model, r"`max_new_tokens`", "hi", max_new_tokens=0)
    _refused(tiny_model("llama", vocab_size=VOCAB), r"this model holds none", "hi")

    model.base_model.disable_adapter_layers()
    _refused(model, r"switched off .*jupyter_lora\.enable", "hi", ["poems", "base"])
    model.base_model.enable_adapter_layers()

    model.merge_adapter()  # PEFT's merge that keeps the wrapper
    _refused(model, r"'code' is merged into the base weights.*unmerge", "hi", ["poems", "base"])
    model.unmerge_adapter()

    run = types.SimpleNamespace(done=False, step=2, total_steps=9)
    assert runs.register(model, run)
    try:
        _refused(model, r"Cannot generate while this model is training \(step 2/9\)", "hi")
    finally:
        runs.finish(model)


def test_adapters_peft_cannot_mix_are_refused_in_our_words():
    model = with_adapters(names=("poems",))
    model = jl.inject(model, name="dora", r=4, targets="all-linear", variant="dora")
    _refused(model, r"'dora' is a DoRA adapter, and PEFT cannot run DoRA adapters in a mixed batch", "hi",
             ["poems", "dora"])  # fmt: skip
    moe = jl.inject(tiny_model("mixtral", vocab_size=VOCAB), r=2, targets="experts", name="experts")
    _refused(moe, r"'experts' adapts fused expert weights \(`.*experts`\)", "hi", ["experts", "base"])


# ------------------------------------------------------------------------------------------------ hot-swap


def saved(tmp_path, name: str, seed: int, **settings):
    model = jl.inject(
        tiny_model("llama"), name="poems", r=settings.pop("r", 4), targets="all-linear", **settings
    )
    randomize(model, "poems", seed)
    return jl.save(model, tmp_path / name)


def identities(model):
    return [(n, id(m)) for n, m in model.named_modules()] + [(n, id(p)) for n, p in model.named_parameters()]


def test_hotswap_replaces_the_weights_in_place(tmp_path):
    first, second = saved(tmp_path, "first", 1), saved(tmp_path, "second", 2)
    model = jl.load(tiny_model("llama"), first, name="poems")
    model = jl.load(model, saved(tmp_path, "other", 3), name="code")  # another adapter beside it: untouched
    jl.use(model, "poems")
    code = {k: v.clone() for k, v in model.state_dict().items() if ".code." in k}
    inputs = tiny_inputs(model)
    before = model(**inputs).logits
    ids = identities(model)

    assert jl.load(model, second, name="poems", hotswap=True) is model
    assert identities(model) == ids  # the same modules and parameter objects
    expected = jl.load(tiny_model("llama"), second, name="poems")(**inputs).logits
    assert torch.equal(model(**inputs).logits, expected)
    assert not torch.equal(before, expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in code.items())


def test_hotswap_leaves_an_adapter_whose_name_contains_the_slots_alone(tmp_path):
    # PEFT finds the slot's tensors by substring: "poems2"'s tensors would be zeroed as "missing" ones
    model = jl.load(tiny_model("llama"), saved(tmp_path, "a", 1), name="poems")
    model = jl.load(model, saved(tmp_path, "b", 2), name="poems2")
    other = {k: v.clone() for k, v in model.state_dict().items() if ".poems2." in k}
    jl.load(model, saved(tmp_path, "c", 3), name="poems", hotswap=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.items())


def test_a_compiled_model_is_not_recompiled_by_the_index_hooks():
    model = jl.inject(tiny_model("llama"), name="poems", r=4, targets="all-linear")
    inputs = tiny_inputs(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled(**inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(**inputs)


def test_compiled_model_takes_a_hotswap_without_recompiling(tmp_path):
    model = jl.load(tiny_model("llama"), saved(tmp_path, "first", 1), name="poems")
    second = saved(tmp_path, "second", 2)
    inputs = tiny_inputs(model)
    expected = jl.load(tiny_model("llama"), second, name="poems")(**inputs).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # dynamo's graph capture, without a C++ toolchain
    compiled(**inputs)
    jl.load(model, second, name="poems", hotswap=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(**inputs).logits
    torch.testing.assert_close(out, expected)


def test_prepared_model_takes_larger_ranks_and_other_alphas_without_recompiling(tmp_path):
    model = jl.load(tiny_model("llama"), saved(tmp_path, "first", 1), name="poems")
    bigger = saved(tmp_path, "bigger", 2, r=8, alpha=4)
    inputs = tiny_inputs(model)
    expected = jl.load(tiny_model("llama"), bigger, name="poems")(**inputs).logits
    before = model(**inputs).logits
    jl.prepare_hotswap(model, r=8)
    torch.testing.assert_close(model(**inputs).logits, before)  # padding with zeros changes nothing
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled(**inputs)
    jl.load(model, bigger, name="poems", hotswap=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(**inputs).logits
    torch.testing.assert_close(out, expected)
    config = model.peft_config["poems"]
    assert (config.r, config.lora_alpha) == (8, 4)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"r": 8},
            r"the rank differs — `model\.layers\.0\..*` has r=4 in 'poems' and r=8 in the file.*prepare_hotswap",
        ),
        ({"targets": "q_proj,v_proj"}, r"the targets differ — it leaves out 10 module\(s\) 'poems' adapts"),
        ({"variant": "dora"}, r"`use_dora` is True in the file and False in 'poems'"),
        ({"dropout": 0.1}, r"`lora_dropout` is 0\.1 in the file and 0\.0 in 'poems'"),
    ],
    ids=["rank", "targets", "dora", "dropout"],
)
def test_hotswap_mismatch_names_what_differs_and_changes_nothing(tmp_path, settings, match):
    model = jl.load(tiny_model("llama"), saved(tmp_path, "first", 1), name="poems")
    targets = settings.pop("targets", "all-linear")
    other = jl.inject(tiny_model("llama"), name="poems", r=settings.pop("r", 4), targets=targets, **settings)
    randomize(other, "poems", 5)
    path = jl.save(other, tmp_path / "other")
    before = model_snapshot(model)
    with pytest.raises(jl.UsageError, match=match) as info:
        jl.load(model, path, name="poems", hotswap=True)
    assert "\n" not in str(info.value) and "cannot replace adapter 'poems' in place" in str(info.value)
    assert_model_unchanged(before, model)


def test_hotswap_runs_the_load_checks_first(tmp_path):
    model = jl.load(tiny_model("llama"), saved(tmp_path, "first", 1), name="poems")
    before = model_snapshot(model)
    with pytest.raises(
        jl.UsageError, match=r"no adapter of that name on this model\. Did you mean `poems`\?"
    ):
        jl.load(model, saved(tmp_path, "second", 2), name="poem", hotswap=True)
    damaged = saved(tmp_path, "damaged", 3)
    (damaged / "adapter_config.json").write_text("{not json")
    with pytest.raises(jl.UsageError, match=r"adapter_config\.json is not valid JSON"):
        jl.load(model, damaged, name="poems", hotswap=True)
    wider = jl.inject(tiny_model("llama", hidden_size=64), name="poems", r=4, targets="all-linear")
    with pytest.raises(jl.UsageError, match=r"does not fit this model"):
        jl.load(model, jl.save(wider, tmp_path / "wider"), name="poems", hotswap=True)
    with pytest.raises(jl.UsageError, match=r"has no LoRA adapter"):
        jl.load(tiny_model("llama"), saved(tmp_path, "x", 4), name="poems", hotswap=True)
    assert_model_unchanged(before, model)


def test_generate_says_why_a_merged_model_or_a_classifier_cannot_be_served():
    from jupyter_lora.core.errors import NoAdapterError

    merged = jl.merge(jl.inject(tiny_model("llama"), r=4))
    with pytest.raises(NoAdapterError, match=r"holds none \(a merged model has its adapter in its weights"):
        jl.generate(merged, "hi", tokenizer=tiny_tokenizer())
    with pytest.raises(jl.UsageError, match=r"`generate` makes text .*\(BertForSequenceClassification\)"):
        jl.generate(tiny_model("bert"), "hi", tokenizer=tiny_tokenizer())  # said before "no adapter"
