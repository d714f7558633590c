"""The chat's generation layer (``jupyter_lora.core.chat``) on tiny models: replies are what PEFT's own
``generate`` gives (adapter on), what the base model gives (adapter off), the same streamed or not; the chat
template carries the conversation; classifier probabilities are the model's softmax; and mistakes are one line.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from chat_models import VOCAB, adapted_lm, chat_tokenizer, randomize_lora_b, talk_slowly
from model_state import assert_model_unchanged, model_snapshot
from peft import PeftModel

import jupyter_lora as jl
from jupyter_lora.core import runs
from jupyter_lora.core.chat import Conversation
from jupyter_lora.testing import tiny_config, tiny_model, tiny_tokenizer


@pytest.fixture
def lm():
    return adapted_lm(max_position_embeddings=256)


def template_inputs(tok, messages):
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def greedy(model, inputs, n):
    """The model's own greedy continuation of ``inputs`` (new tokens only), decoded."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tiny_tokenizer().decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- generation


def test_greedy_reply_with_the_adapter_is_pefts_own_generate(lm):
    model, reference = lm
    tok = chat_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=16)
    turn = conversation.send("Hello there")

    expected = greedy(model, template_inputs(tok, [{"role": "user", "content": "Hello there"}]), 16)
    assert isinstance(model, PeftModel)
    assert turn.replies == {"adapter": expected}
    assert len(expected) > 0
    # the adapter matters here: the base model says something else
    base = greedy(reference, template_inputs(tok, [{"role": "user", "content": "Hello there"}]), 16)
    assert base != expected


def test_adapter_off_is_the_base_model(lm):
    model, reference = lm
    tok = chat_tokenizer()
    turn = Conversation(model, tok, temperature=0, max_new_tokens=16, adapter="off").send("Hello there")
    expected = greedy(reference, template_inputs(tok, [{"role": "user", "content": "Hello there"}]), 16)
    assert turn.replies == {"base": expected}


def test_side_by_side_answers_both_from_the_same_seed(lm):
    model, reference = lm
    tok = chat_tokenizer()
    settings = dict(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    both = Conversation(model, tok, adapter="side_by_side", **settings).send("Hi")
    inputs = template_inputs(tok, [{"role": "user", "content": "Hi"}])
    for side, generator in (("adapter", model), ("base", reference)):  # each sampled from seed 7 itself
        torch.manual_seed(7)
        with torch.no_grad():
            out = generator.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.95,
                                     pad_token_id=0)  # fmt: skip
        assert both.replies[side] == tok.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    on = Conversation(model, tok, adapter="on", **settings).send("Hi")
    off = Conversation(model, tok, adapter="off", **settings).send("Hi")
    assert both.replies == {"adapter": on.replies["adapter"], "base": off.replies["base"]}
    assert both.seed == on.seed == off.seed == 7
    # another seed samples another reply (the seed is what makes them equal)
    other = Conversation(model, tok, adapter="on", **{**settings, "seed": 8}).send("Hi")
    assert other.replies["adapter"] != on.replies["adapter"]


def test_sampling_leaves_the_notebooks_random_state_alone(lm):
    model, _ = lm
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Conversation(model, chat_tokenizer(), temperature=1.0, max_new_tokens=5).send("Hi")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("temperature", [0, 0.8], ids=["greedy", "sampled"])
def test_streaming_gives_the_same_text_as_not_streaming(lm, temperature):
    model, _ = lm
    tok = chat_tokenizer()
    settings = dict(temperature=temperature, max_new_tokens=24, adapter="side_by_side")
    plain = Conversation(model, tok, **settings).send("Tell me more")

    streamed = Conversation(model, tok, **settings)
    pieces = list(streamed.stream("Tell me more"))
    assert [side for side, _ in pieces] == sorted((s for s, _ in pieces), key=("adapter", "base").index)
    joined = {side: "".join(p for s, p in pieces if s == side) for side in ("adapter", "base")}
    assert joined == dict(plain.replies)
    assert streamed.turns == [plain]


def test_start_returns_at_once_and_streams_from_a_background_thread(lm):
    model, _ = lm
    seen: list[tuple[str, str, str]] = []
    conversation = Conversation(model, chat_tokenizer(), temperature=0, max_new_tokens=20)
    reply = conversation.start(
        "Hi", on_text=lambda side, text: seen.append((side, text, threading.current_thread().name))
    )
    assert reply.wait(60).done and reply.error is None
    assert seen and all(name != threading.main_thread().name for *_, name in seen)
    assert seen[-1][1] == reply.texts["adapter"] == conversation.turns[-1].replies["adapter"]


def test_the_conversation_is_in_the_prompt_through_the_chat_template(lm):
    model, _ = lm
    tok = chat_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=8, system="Be brief.")
    first = conversation.send("Hi")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.replies["adapter"]},
        {"role": "user", "content": "And then?"},
    ]
    expected_prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert conversation.prompt("And then?") == expected_prompt
    assert "Hi" in expected_prompt and first.replies["adapter"] in expected_prompt
    second = conversation.send("And then?")
    assert second.replies["adapter"] == greedy(model, template_inputs(tok, history), 8)


def test_each_side_keeps_its_own_replies(lm):
    model, _ = lm
    tok = chat_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=8, adapter="side_by_side")
    turn = conversation.send("Hi")
    assert turn.replies["adapter"] != turn.replies["base"]
    assert turn.replies["adapter"] in conversation.prompt("Next", side="adapter")
    assert turn.replies["base"] in conversation.prompt("Next", side="base")
    assert turn.replies["base"] not in conversation.prompt("Next", side="adapter")
    # a turn only one side answered lends that reply to the other
    conversation.configure(adapter="on")
    only = conversation.send("Next")
    assert only.replies.keys() == {"adapter"}
    assert only.replies["adapter"] in conversation.prompt("Last", side="base")


def test_oldest_turns_give_way_to_fit_the_context():
    model, _ = adapted_lm(max_position_embeddings=64)
    tok = chat_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=12)
    for text in ("first question", "second one", "third"):
        conversation.send(text)
    prompt = conversation.prompt("fourth")
    assert len(tok(prompt)["input_ids"]) + 12 <= 64
    assert "fourth" in prompt and "first question" not in prompt
    with pytest.raises(jl.UsageError, match=r"past this model's context of 64 tokens") as info:
        conversation.send("x" * 60)
    assert "\n" not in str(info.value)
    assert len(conversation.turns) == 3  # the refused message left the conversation as it was


def test_without_a_chat_template_each_message_is_continued_as_plain_text(lm):
    model, _ = lm
    tok = tiny_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=10)
    assert "no chat template" in conversation.note and not conversation.templated
    first = conversation.send("Once upon a time")
    inputs = tok("Once upon a time", return_tensors="pt")
    assert first.replies["adapter"] == greedy(model, dict(inputs), 10)
    assert conversation.prompt("The end") == "The end"  # no earlier turns
    assert Conversation(model, chat_tokenizer()).note is None


def test_seq2seq_reply_is_pefts_generate():
    model, _ = adapted_lm("t5")
    tok = tiny_tokenizer()
    turn = Conversation(model, tok, temperature=0, max_new_tokens=8).send("translate this")
    inputs = tok("translate this", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert turn.replies["adapter"] == tok.decode(out[0], skip_special_tokens=True)


def test_a_plain_model_answers_as_itself():
    model = tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=256)
    tok = chat_tokenizer()
    conversation = Conversation(model, tok, temperature=0, max_new_tokens=8)
    assert conversation.adapter_name is None and conversation.sides == ("base",)
    turn = conversation.send("Hi")
    assert turn.replies == {
        "base": greedy(model, template_inputs(tok, [{"role": "user", "content": "Hi"}]), 8)
    }
    with pytest.raises(jl.UsageError, match=r"side_by_side.*has no LoRA adapter"):
        conversation.configure(adapter="side_by_side")
    assert conversation.settings["adapter"] == "on"


def test_chatting_changes_neither_weights_nor_train_modes(lm):
    model, _ = lm
    inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    with torch.no_grad():
        adapted_logits = model(**inputs).logits
    model.train()
    before = model_snapshot(model)
    modes = [m.training for m in model.modules()]
    conversation = Conversation(
        model, chat_tokenizer(), temperature=0.5, max_new_tokens=6, adapter="side_by_side"
    )
    conversation.send("Hi")
    list(conversation.stream("Again"))
    assert_model_unchanged(before, model)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    with torch.no_grad():  # the adapter is on again after the base side's turn
        assert torch.equal(model(**inputs).logits, adapted_logits)


# ----------------------------------------------------------------------------------------------- stop, failures


def test_stop_ends_generation_and_keeps_the_text_so_far():
    model, _ = adapted_lm(max_position_embeddings=2048)
    talk_slowly(model, 0.02)
    conversation = Conversation(
        model, chat_tokenizer(), temperature=1.0, max_new_tokens=1000, adapter="side_by_side"
    )
    started = time.perf_counter()
    reply = conversation.start("Go on")
    assert time.perf_counter() - started < 1.0  # returned at once
    deadline = time.monotonic() + 60
    while not reply.texts["adapter"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reply.texts["adapter"] and not reply.done
    with pytest.raises(jl.UsageError, match=r"A reply is being generated"):
        conversation.send("another")
    reply.stop()
    assert reply.done and reply.stopped and reply.error is None
    assert len(tiny_tokenizer()(reply.texts["adapter"])["input_ids"]) < 1000
    assert reply.texts["base"] == ""  # side by side: the base never started
    assert conversation.turns == [reply.turn]
    assert reply.turn.stopped and reply.turn.replies == {"adapter": reply.texts["adapter"]}
    assert not [t for t in threading.enumerate() if t.name.startswith("jupyter_lora chat")]


def test_a_failure_in_generate_is_kept_on_the_reply(lm, monkeypatch):
    model, _ = lm
    conversation = Conversation(model, chat_tokenizer(), max_new_tokens=5)

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "generate", broken)
    reply = conversation.start("Hi").wait(30)
    assert reply.done and isinstance(reply.error, RuntimeError)
    assert conversation.turns == []
    with pytest.raises(RuntimeError, match="simulated"):
        list(conversation.stream("Hi"))


def test_a_model_in_training_is_refused(lm, tmp_path):
    model, _ = lm
    conversation = Conversation(model, chat_tokenizer(), max_new_tokens=4)
    release = threading.Event()
    stepped = threading.Event()

    def hold(event):  # keep the run in its first step until the test is done chatting
        if event.kind == "step":
            stepped.set()
            release.wait(60)

    run = jl.train(model, ["some text to learn"] * 8, tokenizer=tiny_tokenizer(), steps=2, batch=2, eval=0,
                   observers=[hold], output_dir=str(tmp_path / "run"))  # fmt: skip
    try:
        assert stepped.wait(120)
        with pytest.raises(
            jl.UsageError, match=r"Cannot generate while this model is training \(step"
        ) as info:
            conversation.send("Hi")
        assert "\n" not in str(info.value)
        with pytest.raises(jl.UsageError, match=r"training"):
            jl.chat(model, chat_tokenizer())
        assert conversation.turns == []
    finally:
        release.set()
        run.wait(120)
    assert runs.active_run(model) is None
    assert conversation.send("Hi").replies["adapter"] is not None


# ----------------------------------------------------------------------------------------------- tokenizer, mistakes


def test_the_tokenizer_saved_beside_the_model_is_found(lm, tmp_path):
    model, _ = lm
    with pytest.raises(jl.UsageError, match=r"`tokenizer` is needed.*--tokenizer"):
        Conversation(model)
    chat_tokenizer().save_pretrained(tmp_path)
    model.get_base_model().config._name_or_path = str(tmp_path)
    conversation = Conversation(model)
    assert conversation.templated
    assert conversation.prompt("Hi") == chat_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )


BAD_SETTINGS = [
    ("temperature-negative", {"temperature": -0.1}, r"`temperature` must be in \[0, 2\], got -0.1"),
    ("temperature-too-high", {"temperature": 5}, r"`temperature` must be in \[0, 2\], got 5"),
    ("temperature-text", {"temperature": "hot"}, r"`temperature` must be a finite number.*'hot'"),
    ("top-p-zero", {"top_p": 0}, r"`top_p` must be a positive number at most 1, got 0"),
    ("top-p-above-one", {"top_p": 1.5}, r"`top_p` must be a positive number at most 1, got 1.5"),
    (
        "max-new-tokens-zero",
        {"max_new_tokens": 0},
        r"`max_new_tokens` must be a positive whole number.*got 0",
    ),
    ("max-new-tokens-huge", {"max_new_tokens": 10**7}, r"`max_new_tokens` must be .*at most 65536"),
    ("max-new-tokens-float", {"max_new_tokens": 2.5}, r"`max_new_tokens` must be a whole number.*2.5"),
    (
        "adapter-misspelled",
        {"adapter": "sidebyside"},
        r"`adapter` must be one of on, off, side_by_side.*Did you",
    ),
    ("seed-negative", {"seed": -1}, r"`seed` must be .*got -1"),
    ("unknown-setting", {"temprature": 0.5}, r"Unknown setting `temprature`.*Did you mean `temperature`"),
    ("training-setting", {"lr": 1e-4}, r"`lr` .*is not one of the settings taken here"),
]


@pytest.mark.parametrize(
    ("given", "pattern"), [b[1:] for b in BAD_SETTINGS], ids=[b[0] for b in BAD_SETTINGS]
)
def test_bad_settings_are_one_line_and_change_nothing(lm, given, pattern):
    model, _ = lm
    with pytest.raises(jl.UsageError, match=pattern) as info:
        Conversation(model, chat_tokenizer(), **given)
    assert "\n" not in str(info.value)
    conversation = Conversation(model, chat_tokenizer())
    before = dict(conversation.settings)
    with pytest.raises(jl.UsageError, match=pattern):
        conversation.configure(**given)
    assert conversation.settings == before


def test_spellings_of_the_adapter_setting():
    model, _ = adapted_lm()
    for spelled, mode in ((True, "on"), (False, "off"), ("side-by-side", "side_by_side"), ("side by side", "side_by_side"),
                          ("OFF", "off")):  # fmt: skip
        assert Conversation(model, chat_tokenizer(), adapter=spelled).settings["adapter"] == mode


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: 42, r"`model` must be a torch.nn.Module.*got int"),
        (
            lambda: __import__("transformers").BertModel(tiny_config("bert")),
            r"`chat` generates with causal or seq2seq LMs.*BertModel\) is for FEATURE_EXTRACTION",
        ),
    ],
    ids=["not-a-model", "encoder-without-head"],
)
def test_what_cannot_chat_is_refused_in_one_line(make, pattern):
    with pytest.raises(jl.UsageError, match=pattern) as info:
        Conversation(make(), chat_tokenizer())
    assert "\n" not in str(info.value)


def test_empty_message_and_tokens_the_model_lacks(lm):
    model, _ = lm
    conversation = Conversation(model, chat_tokenizer())
    for text in ("", "   ", None):
        with pytest.raises(jl.UsageError, match=r"The message must be non-empty text"):
            conversation.send(text)
    small = jl.inject(tiny_model("llama", vocab_size=40), r=2, targets="q_proj")
    with pytest.raises(jl.UsageError, match=r"outside the model's vocabulary \(ids 0-39\)"):
        Conversation(small, tiny_tokenizer()).send("zzz")


# ----------------------------------------------------------------------------------------------- classifiers


def test_classifier_probabilities_are_the_models_softmax():
    base = tiny_model("bert", vocab_size=VOCAB)
    base.config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
    reference = copy.deepcopy(base)
    model = jl.inject(base, r=4, targets="attention")
    randomize_lora_b(model)
    tok = tiny_tokenizer()
    result = Conversation(model, tok).classify("what a day")

    inputs = dict(tok("what a day", return_tensors="pt"))
    with torch.no_grad():
        adapter = model(**inputs).logits.softmax(-1)[0]
        base_probs = reference(**inputs).logits.softmax(-1)[0]
    assert result.labels == ("negative", "neutral", "positive")
    assert sum(result.probs["adapter"]) == pytest.approx(1.0, abs=1e-6)
    assert sum(result.probs["base"]) == pytest.approx(1.0, abs=1e-6)
    assert result.probs["adapter"] == pytest.approx(adapter.tolist(), abs=1e-6)
    assert result.probs["base"] == pytest.approx(base_probs.tolist(), abs=1e-6)
    assert result.probs["adapter"] != pytest.approx(result.probs["base"], abs=1e-4)
    assert result.top("adapter") == result.labels[int(adapter.argmax())]

    plain = Conversation(reference, tok).classify("what a day")
    assert list(plain.probs) == ["base"] and plain.probs["base"] == pytest.approx(
        base_probs.tolist(), abs=1e-6
    )
    with pytest.raises(jl.UsageError, match=r"sequence classifier.*classify"):
        Conversation(model, tok).send("what a day")
