"""The chat on CUDA (skipped without a GPU): replies on a bf16 model are PEFT's own generate, side by side samples
both sides from the seed, Stop ends a streaming reply, and the notebook's CUDA random state is left alone."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from chat_models import VOCAB, chat_tokenizer, randomize_lora_b, talk_slowly

import jupyter_lora as jl
from jupyter_lora.testing import tiny_model

pytestmark = pytest.mark.gpu


def _adapted():
    model = tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=4096).to("cuda", torch.bfloat16)
    model = jl.inject(model, r=4, targets="all-linear")
    randomize_lora_b(model)
    return model


def _inputs(tok, text):
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")  # fmt: skip
    return {k: enc[k].to("cuda") for k in ("input_ids", "attention_mask")}


def test_replies_on_cuda_are_pefts_generate_from_the_seed():
    model, tok = _adapted(), chat_tokenizer()
    inputs = _inputs(tok, "Hi")
    n = inputs["input_ids"].shape[1]
    turn = jl.Conversation(model, tok, temperature=0, max_new_tokens=16).send("Hi")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert turn.replies["adapter"] == tok.decode(out[0, n:], skip_special_tokens=True)

    torch.cuda.manual_seed(5)
    cuda_state = torch.cuda.get_rng_state()
    both = jl.Conversation(model, tok, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3,
                        adapter="side_by_side").send("Hi")  # fmt: skip
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    for side in ("adapter", "base"):
        torch.manual_seed(3)
        with torch.no_grad(), model.disable_adapter() if side == "base" else contextlib.nullcontext():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9,
                                 pad_token_id=0)  # fmt: skip
        assert both.replies[side] == tok.decode(out[0, n:], skip_special_tokens=True), side


def test_stop_ends_a_streaming_reply_on_cuda():
    model = _adapted()
    talk_slowly(model, 0.01)
    conversation = jl.Conversation(model, chat_tokenizer(), temperature=1.0, max_new_tokens=3000)
    reply = conversation.start("Go on")
    deadline = time.monotonic() + 60
    while not reply.texts["adapter"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reply.texts["adapter"]
    reply.stop()
    assert reply.done and reply.stopped and reply.error is None
    assert conversation.turns[-1].stopped
