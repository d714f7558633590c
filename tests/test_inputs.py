"""Inputs that used to be misread or to fail deep inside a library: a model variable named like a subcommand, a
model id looked up with no network, settings past what can be built, token ids outside the model's vocabulary.
Each must give one clear ``UsageError`` at once and leave the model as it was.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from IPython.core.error import UsageError as IPythonUsageError
from model_state import assert_model_unchanged, model_snapshot

import jupyter_lora as jl
from jupyter_lora.core.data import prepare_data, vocab_size_of
from jupyter_lora.core.errors import UsageError
from jupyter_lora.settings import validate_one
from jupyter_lora.testing import tiny_model, tiny_tokenizer

# ----------------------------------------------------------------------------------------------- the magic


@pytest.fixture
def ip():
    """The test shell with the extension freshly loaded; the variables a test adds are removed after it."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython() or get_ipython()
    shell.config.pop("LoraMagics", None)
    if "jupyter_lora" in shell.extension_manager.loaded:
        shell.extension_manager.unload_extension("jupyter_lora")
    shell.extension_manager.load_extension("jupyter_lora")
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        del shell.user_ns[name]


@pytest.mark.parametrize("variable", ["merged", "plain", "loader", "stats", "saved"])
def test_a_model_variable_named_like_a_subcommand_is_the_model(ip, variable):
    model = tiny_model("llama")
    ip.user_ns[variable] = model
    before = model_snapshot(model)
    summary = ip.run_cell_magic("lora", f"{variable} --dry-run", "r: 4\ntargets: q_proj")
    assert summary.dry_run and summary.plan.spec.r == 4
    assert ip.user_ns[variable] is model
    assert_model_unchanged(before, model)

    adapted = ip.run_cell_magic("lora", variable, "r: 4\ntargets: q_proj")
    assert ip.user_ns[variable] is not model and [
        a.name for a in jl.status(ip.user_ns[variable]).adapters
    ] == ["default"]
    assert adapted.plan.name == "default"


def test_a_word_near_a_subcommand_without_such_a_model_is_still_a_misspelling(ip):
    ip.user_ns["model"] = tiny_model("llama")
    ip.user_ns["merged"] = 3  # a variable, but no model
    with pytest.raises(IPythonUsageError, match=r"unknown subcommand 'merged'.*`merge`.*No model variable"):
        ip.run_cell_magic("lora", "merged --dry-run", "r: 4")


def test_a_huge_rank_in_a_cell_is_one_line_and_changes_nothing(ip):
    model = ip.user_ns["model"] = tiny_model("llama")
    before = model_snapshot(model)
    for body in ("r: 1e30", "r: 1000000000000000000000000000000"):
        with pytest.raises(IPythonUsageError) as info:
            ip.run_cell_magic("lora", "model", body)
        message = str(info.value)
        assert message.startswith("`r` must be") and "at most 65536" in message and "\n" not in message
    assert ip.user_ns["model"] is model
    assert_model_unchanged(before, model)


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("name", "value"), [("steps", 1e30), ("seq", 10**19), ("save_every", 2**63)])
def test_whole_numbers_past_64_bits_are_refused(name, value):
    with pytest.raises(
        UsageError, match=rf"`{name}` must be a whole number below 2\*\*63, got {re.escape(repr(value))}\."
    ):
        validate_one(name, value)
    assert validate_one(name, 2**62) == 2**62


# ----------------------------------------------------------------------------------------------- the Hub offline

_OFFLINE_ESTIMATE = textwrap.dedent(
    """
    import json, sys, time
    import jupyter_lora as jl
    from jupyter_lora.testing import tiny_config
    jl.estimate(tiny_config("llama"))  # the imports and the estimate itself, warmed up before the clock starts
    start = time.monotonic()
    try:
        jl.estimate(sys.argv[1])
        outcome = ("no error", "")
    except Exception as exc:
        outcome = (type(exc).__name__, str(exc))
    print(json.dumps([*outcome, time.monotonic() - start]))
    """
)


def _estimate_without_network(tmp_path, source: str) -> tuple[str, str, float]:
    """``jl.estimate(source)`` in a fresh process whose Hub endpoint refuses connections, not in offline mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hub")
    )
    out = subprocess.run(
        [sys.executable, "-c", _OFFLINE_ESTIMATE, source],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    kind, message, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    return kind, message, seconds


def test_a_model_id_without_network_fails_at_once(tmp_path):
    kind, message, seconds = _estimate_without_network(tmp_path, "no/such-id")
    assert kind == "UsageError", message
    assert seconds < 5, f"took {seconds:.1f} s (huggingface_hub retries for ~25 s)"
    assert "'no/such-id'" in message and "cannot be reached" in message and "http://127.0.0.1:9" in message
    assert "local model directory" in message and "\n" not in message


def test_a_cached_config_is_read_without_network(tmp_path):
    # the Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/config.json}
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text(tiny_model("llama").config.to_json_string())
    kind, message, seconds = _estimate_without_network(tmp_path, "org/tiny")
    assert kind == "no error", message
    assert seconds < 5, f"took {seconds:.1f} s"


# ----------------------------------------------------------------------------------------------- token ids


def test_pretokenized_ids_outside_the_vocabulary_name_the_record_and_the_id():
    vocab = vocab_size_of(tiny_model("llama"))
    assert vocab == 128
    good = {"input_ids": [1, 2, 3]}
    with pytest.raises(UsageError) as info:
        prepare_data([good, good, {"input_ids": [1, 128, 3]}], None, vocab_size=vocab)
    message = str(info.value)
    assert "`data` record 2" in message and "`input_ids`" in message and "token id 128" in message
    assert "0-127" in message and "resize_token_embeddings" in message
    with pytest.raises(UsageError, match=r"`data` record 0: `input_ids` holds token id -1\b"):
        prepare_data([{"input_ids": [-1, 2]}], None, vocab_size=vocab)
    with pytest.raises(UsageError, match=r"`eval_data` record 1: `labels` holds token id 500\b.*-100"):
        prepare_data(
            [good], None, vocab_size=vocab, eval_data=[good, {"input_ids": [1, 2], "labels": [-100, 500]}]
        )
    prepared = prepare_data([good, {"input_ids": [1, 127], "labels": [-100, 127]}], None, vocab_size=vocab)
    assert len(prepared.train) == 2  # -100 labels and the last id are fine


def test_a_tokenizer_with_ids_the_model_lacks_is_refused():
    model = tiny_model("llama", vocab_size=60)  # tiny_tokenizer's ids go up to 97
    assert vocab_size_of(model) == 60
    with pytest.raises(UsageError) as info:
        prepare_data(["hello world"], tiny_tokenizer(), vocab_size=vocab_size_of(model))
    message = str(info.value)
    assert message.startswith("`tokenizer` gives a token id") and "0-59" in message
    assert "resize_token_embeddings(len(tokenizer))" in message


def test_a_pad_id_outside_the_vocabulary_matters_only_when_padding():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<new-pad>"})  # a new token, the model not resized
    data = [{"input_ids": [3, 4, 5]}, {"input_ids": [3, 4]}]
    vocab = tokenizer.pad_token_id  # the pad id is one past the last row
    assert vocab == len(tokenizer) - 1 > 5
    with pytest.raises(UsageError, match=rf"`tokenizer` gives the pad id {vocab}\b"):
        prepare_data(data, tokenizer, vocab_size=vocab)
    assert prepare_data(data, tokenizer, vocab_size=vocab, packing=True).packing


def test_the_vocabulary_is_the_embedding_rows_after_a_resize():
    model = jl.inject(tiny_model("llama"), r=2, targets="q_proj")
    assert vocab_size_of(model) == 128
    base = tiny_model("llama")
    base.resize_token_embeddings(140)
    assert vocab_size_of(base) == 140
