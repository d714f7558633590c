"""The data preview: what it shows is what training uses — the token ids and the -100 labels of the records
shown equal those of the run's own preparation (``prepare_for``, the call ``train`` makes); truncation counts,
packing and padding efficiency, split sizes and dropped records are counted right; the settings are checked as
training checks them; the renderings escape user text; nothing is changed."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from chat_templates import GEN_TEMPLATE, PLAIN_TEMPLATE
from model_state import assert_model_unchanged, model_snapshot

import jupyter_lora as jl
import jupyter_lora.data_preview as rendering
from jupyter_lora.core.data.preview import report_data
from jupyter_lora.core.errors import UsageError
from jupyter_lora.core.train import make_train_config, prepare_for
from jupyter_lora.testing import tiny_model, tiny_tokenizer

EOS = 1


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"q{i}?"},
            {"role": "assistant", "content": f"a{i}"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok" * (i % 3 + 1)},
        ]
    }


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def classifier():
    return tiny_model("bert", num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})


@pytest.fixture
def tok():
    return tiny_tokenizer()


def training_examples(model, data, tok, **settings) -> dict[int, dict]:
    """The examples the training run would hold, by record index: the run's own preparation, split by split."""
    config = make_train_config(**settings)
    prepared = prepare_for(model, config, data, tok, None)
    return {"train": prepared.train, "eval": prepared.eval or []}, prepared


def check_against_training(report, model, data, tok, **settings) -> int:
    """Every record the preview shows in a split is, token for token and label for label, an example of that
    split in the run's own preparation — in the same position among the split's shown records; returns how many
    were compared."""
    splits, _ = training_examples(model, data, tok, **settings)
    compared = 0
    seen = {"train": 0, "eval": 0}
    for view in report.records:
        if view.split is None:
            continue
        example = splits[view.split][seen[view.split]]
        seen[view.split] += 1
        assert list(view.input_ids) == example["input_ids"]
        if "labels" in example:
            assert list(view.labels) == example["labels"]
            # the segments (what is greyed) follow the labels exactly, token for token
            flags = [s.trained for s in view.segments for _ in range(s.tokens)]
            assert flags == [label != -100 for label in example["labels"]]
        else:
            assert view.labels is None and all(s.trained is None for s in view.segments)
        # and the text shown is the decoded ids, nothing added or lost
        shown = "".join(s.text for s in view.segments)
        assert shown == tok.decode(example["input_ids"], skip_special_tokens=False)
        compared += 1
    return compared


# ----------------------------------------------------------------------------------------------- same as training


CASES = {
    "prompt-response": (
        [{"prompt": f"Q{i}: what is {i}? ", "response": f"It is {i}."} for i in range(12)],
        dict(seq=24, eval=0.25),
    ),
    "instruction-output-cut": (
        [{"instruction": "Say " * (i + 1), "output": "done"} for i in range(6)],
        dict(seq=20, eval=0),
    ),
    "text": (["the quick brown fox " * (i + 1) for i in range(5)], dict(seq=30, eval=0)),
    "pretokenized": (
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 4,
        dict(seq=4, eval=0),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_records_shown_are_the_training_examples(model, tok, name):
    data, settings = CASES[name]
    report = report_data(model, data, tok, n=len(data), **settings)
    assert check_against_training(report, model, data, tok, **settings) >= 3


@pytest.mark.parametrize(
    "template", [GEN_TEMPLATE, PLAIN_TEMPLATE], ids=["generation-mask", "prefix-lengths"]
)
def test_chat_template_records_match_training_masks(model, tok, template):
    tok.chat_template = template
    data = [chat(i) for i in range(8)]
    report = report_data(model, data, tok, n=8, seq=64, eval=0)
    assert check_against_training(report, model, data, tok, seq=64, eval=0) == 8
    first = report.records[0]
    # the template is applied; the assistant replies (and their eos) are what is trained, the rest is grey
    trained = [s.text for s in first.segments if s.trained]
    masked = "".join(s.text for s in first.segments if s.trained is False)
    assert trained[0].startswith("a0") and "<eos>" in trained[0]
    assert masked.startswith("S:be brief|U:q0?|")
    assert "ok" in trained[-1]


def test_chat_template_setting_formats_messages_and_leaves_the_tokenizer_alone(model, tok):
    assert tok.chat_template is None
    data = [chat(i) for i in range(4)]
    with pytest.raises(UsageError, match="has no chat template"):
        report_data(model, data, tok, eval=0)
    report = report_data(model, data, tok, eval=0, seq=64, chat_template=PLAIN_TEMPLATE)
    assert tok.chat_template is None
    assert "".join(s.text for s in report.records[0].segments).startswith("S:be brief|U:q0?|A:a0<eos>|")
    # training gets the same: the setting reaches the run's preparation
    assert check_against_training(report, model, data, tok, eval=0, seq=64, chat_template=PLAIN_TEMPLATE) == 3
    tok.chat_template = PLAIN_TEMPLATE
    own = report_data(model, data, tok, eval=0, seq=64)
    assert [r.input_ids for r in own.records] == [r.input_ids for r in report.records]


def test_a_named_chat_template_is_chosen_by_name_and_a_wrong_name_is_refused(model, tok):
    tok.chat_template = {"default": GEN_TEMPLATE, "plain": PLAIN_TEMPLATE}
    data = [chat(i) for i in range(3)]
    plain = report_data(model, data, tok, eval=0, seq=64, chat_template="plain")
    default = report_data(model, data, tok, eval=0, seq=64)
    assert "".join(s.text for s in plain.records[0].segments).startswith("S:be brief|U:q0?|A:a0<eos>|")
    assert "".join(s.text for s in default.records[0].segments).startswith("S:be brief|U:q0?|A:a0<eos>|")
    # same text, different masks: {% generation %} trains "a0<eos>"; prefix lengths also train the "|" after it
    assert plain.records[0].input_ids == default.records[0].input_ids
    trained = [[s.text for s in r.records[0].segments if s.trained] for r in (plain, default)]
    assert trained == [["a0<eos>|", "ok<eos>|"], ["a0<eos>", "ok<eos>"]]
    with pytest.raises(UsageError, match=r"`chat_template`='plian'.*Did you mean `plain`\?"):
        report_data(model, data, tok, eval=0, chat_template="plian")


def test_classification_records_show_their_class(classifier, tok):
    data = [{"text": f"review {i} " * (i + 1), "label": ["neg", "pos"][i % 2]} for i in range(6)]
    report = report_data(classifier, data, tok, n=6, seq=20, eval=0)
    assert report.task == "SEQ_CLS" and report.label_names == ("neg", "pos")
    assert [v.label for v in report.records] == ["neg", "pos"] * 3
    assert check_against_training(report, classifier, data, tok, seq=20, eval=0) == 6
    assert report.target_tokens is None


def test_columns_settings_reach_the_preparation(model, classifier, tok):
    data = [{"body": "hello there", "title": "x"}] * 3
    with pytest.raises(UsageError, match="`body`"):  # no known column: the error names the columns found
        report_data(model, data, tok, eval=0)
    report = report_data(model, data, tok, eval=0, text_column="body")
    assert "".join(s.text for s in report.records[0].segments) == "hello there<eos>"
    with pytest.raises(UsageError, match=r"`text_column`='bdy' is not a column.*Did you mean `body`\?"):
        report_data(model, data, tok, eval=0, text_column="bdy")
    rows = [{"text": "good", "sentiment": 1}, {"text": "bad", "sentiment": 0}]
    report = report_data(classifier, rows, tok, eval=0, label_column="sentiment")
    assert [v.label for v in report.records] == ["pos", "neg"]


# ----------------------------------------------------------------------------------------------- the counts


def test_lengths_and_truncation_counts(model, tok):
    texts = ["x" * k for k in (3, 9, 10, 11, 25, 40)]  # + eos: 4, 10, 11, 12, 26, 41 tokens
    report = report_data(model, texts, tok, n=6, seq=11, eval=0)
    assert sorted(report.lengths) == [4, 10, 11, 12, 26, 41]
    assert report.truncated == 3 and report.truncated_share == pytest.approx(0.5)
    assert [v.cut for v in report.records] == [0, 0, 0, 1, 15, 30]
    assert [len(v.input_ids) for v in report.records] == [4, 10, 11, 11, 11, 11]
    assert report.tokens == 4 + 10 + 11 + 11 * 3
    # causal LM: every token after the first of each example is a target
    assert report.target_tokens == report.tokens - 6


def test_padding_and_packing_efficiency(model, tok):
    texts = ["a", "abc"]  # 2 and 4 tokens with eos: one batch of two rows of 4 slots
    padded = report_data(model, texts, tok, batch=2, eval=0)
    assert padded.padding_efficiency == pytest.approx(6 / 8) and padded.packing_efficiency is None
    assert padded.rows == 1
    packed = report_data(model, texts, tok, batch=2, eval=0, packing=True)
    assert packed.packing_efficiency == 1.0 and packed.padding_efficiency == pytest.approx(6 / 8)
    many = report_data(model, ["ab" * (i + 1) for i in range(10)], tok, batch=4, eval=0, packing=True)
    assert many.rows == math.ceil(10 / 4)
    # the packed rows hold every token of every example: the counts the collator gives
    _, prepared = training_examples(
        model, ["ab" * (i + 1) for i in range(10)], tok, batch=4, eval=0, packing=True
    )
    rows = list(prepared.batches("train", 4))
    assert sum(r["input_ids"].numel() for r in rows) == many.tokens == sum(range(3, 22, 2))


@pytest.mark.parametrize(
    ("n", "settings", "expected"),
    [
        (120, {}, (108, 12, "split")),  # auto: 10% from 100 examples on
        (50, {}, (50, 0, None)),
        (40, {"eval": 0.25}, (30, 10, "split")),
        (40, {"eval": 7}, (33, 7, "split")),
    ],
)
def test_split_sizes(model, tok, n, settings, expected):
    report = report_data(model, [f"t{i}" for i in range(n)], tok, **settings)
    assert (report.train, report.eval, report.eval_from) == expected
    _, prepared = training_examples(model, [f"t{i}" for i in range(n)], tok, **settings)
    assert (len(prepared.train), len(prepared.eval or [])) == expected[:2]


def test_eval_records_are_labelled_eval_and_eval_data_is_counted_apart(model, tok):
    data = [f"t{i}" for i in range(10)]
    report = report_data(model, data, tok, n=10, eval=3, seed=1)
    _, prepared = training_examples(model, data, tok, eval=3, seed=1)
    held = {tok.decode(ex["input_ids"]) for ex in prepared.eval}
    shown = {"".join(s.text for s in v.segments) for v in report.records if v.split == "eval"}
    assert shown == held and len(shown) == 3
    # each record shows its own text, whichever split it went to
    assert [("".join(s.text for s in v.segments), v.split in ("train", "eval")) for v in report.records] == [
        (f"t{i}<eos>", True) for i in range(10)
    ]
    apart = report_data(model, data, tok, eval_data=["e1", "", "e2"])
    assert (apart.train, apart.eval, apart.eval_from, apart.n_eval_records) == (10, 2, "eval_data", 3)
    assert [(d.source, d.record, d.reason) for d in apart.dropped] == [("eval_data", 1, "empty text")]


def test_dropped_records_and_why(model, tok):
    data = [
        {"prompt": "hi ", "response": "there"},
        {"prompt": "hi ", "response": ""},
        {"prompt": "a very long prompt that fills seq ", "response": "x"},
        {"prompt": "ok ", "response": None},
        {"prompt": "fine ", "response": "yes"},
    ]
    report = report_data(model, data, tok, n=5, seq=16, eval=0)
    assert [(d.record, d.reason) for d in report.dropped] == [
        (1, "empty `response`"),
        (2, "nothing to learn in the first `seq`=16 tokens (the prompt fills them)"),
        (3, "empty `response`"),
    ]
    assert [v.split for v in report.records] == ["train", None, None, None, "train"]
    assert report.records[2].dropped.startswith("nothing to learn") and report.records[2].length == 36
    assert report.train == 2
    groups = report.drop_reasons()
    assert list(groups) == ["empty `response`", report.dropped[1].reason]
    _, prepared = training_examples(model, data, tok, seq=16, eval=0)
    assert prepared.dropped == 1 and len(prepared.train) == 2  # the counts training keeps agree


# ----------------------------------------------------------------------------------------------- settings, safety


def test_settings_are_checked_as_training_checks_them(model, tok):
    with pytest.raises(UsageError, match=r"Unknown training setting `sqe`\. Did you mean `seq`\?"):
        report_data(model, ["a"], tok, sqe=5)
    with pytest.raises(UsageError, match=r"`seq` must be a positive whole number"):
        report_data(model, ["a"], tok, seq=0)
    with pytest.raises(UsageError, match=r"`n` \(records shown\)"):
        report_data(model, ["a"], tok, n=-1)
    with pytest.raises(UsageError, match=r"`early_stop` needs evaluation data"):
        report_data(model, ["a"] * 5, tok, early_stop=2)
    with pytest.raises(UsageError, match=r"`model` must be a torch\.nn\.Module"):
        report_data("model", ["a"], tok)
    # aliases, as training takes them
    assert report_data(model, ["abcdef"], tok, max_length=3, eval=0).truncated == 1


def test_nothing_is_changed(model, tok):
    tok.chat_template = PLAIN_TEMPLATE
    data = [chat(i) for i in range(5)]
    before, data_before = model_snapshot(model), copy.deepcopy(data)
    vocab = tok.get_vocab()
    preview = jl.preview_data(model, data, tok, seq=40, packing=True)
    assert isinstance(preview, jl.DataPreview) and preview.train == 5
    assert_model_unchanged(before, model)
    assert data == data_before and tok.get_vocab() == vocab and tok.chat_template == PLAIN_TEMPLATE


def test_a_model_with_an_adapter_previews_the_same(model, tok):
    data = [{"prompt": "p ", "response": "r"}] * 3
    adapted = jl.inject(tiny_model("llama"), r=2, targets="q_proj")
    assert report_data(adapted, data, tok).records == report_data(model, data, tok).records


# ----------------------------------------------------------------------------------------------- renderings


def test_html_greys_masked_tokens_marks_the_cut_and_escapes_user_text(model, tok, monkeypatch):
    monkeypatch.setattr(rendering, "_PLOTLY_JS_SENT", False)
    data = [{"prompt": "<script>alert('x')</script> & ", "response": "<b>bold</b>" * 3}]
    preview = jl.preview_data(model, data, tok, seq=50, eval=0)
    page = preview._repr_html_()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; " in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    tokens = page[page.index("<pre class='jl-tokens'") :]
    masked = tokens[tokens.index("<span class='jl-masked'") :]
    assert masked.index("&lt;script&gt;") < masked.index("</span>")  # the prompt is in the grey span
    assert "color:#9e9e9e" in masked[: masked.index(">")]
    assert "class='jl-cut'" in tokens and "more tokens cut at seq 50" in tokens
    # the histogram: a plotly chart (with plotly.js the first time), and the text one for script-less viewers
    assert "Plotly.newPlot" in page and "class='jl-hist-text'" in page
    second = preview._repr_html_()
    assert len(second) < len(page) - 1_000_000  # plotly.js goes out once per page


def test_html_without_plotly_has_the_text_histogram(model, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # import fails
    page = jl.preview_data(model, ["ab", "abcd"], tok, eval=0)._repr_html_()
    assert "Plotly" not in page and "<pre class='jl-hist-text'>" in page and "█" in page


def test_text_rendering(model, tok):
    data = [{"prompt": "Q: ", "response": "yes"}, {"prompt": "Q: ", "response": ""}]
    text = repr(jl.preview_data(model, [*data, {"prompt": "Q: ", "response": "y" * 30}], tok, seq=12, eval=0))
    lines = text.splitlines()
    assert lines[0] == "Data preview — causal LM, seq 12, batch 8"
    assert "  truncated  1 of 2 examples (50.0%) are longer than seq 12" in lines
    assert "  dropped    1 record(s): 1 × empty `response`" in lines
    assert "  ⟦Q: ⟧yes<eos>" in lines
    assert "record 1 · dropped: empty `response`" in lines
    assert "  ⟦Q: ⟧yyyyyyyyy ✂ [22 more tokens cut at seq 12]" in lines
    assert (
        "  padding    1 batch of 8: 79% real tokens, 21% padding (packing: true packs them without padding)"
        in lines
    )
    marked = [line.split("–")[0].strip() for line in lines if line.endswith("✂ cut by seq")]
    assert marked == ["31"], text  # the one bin above seq that holds an example


def test_histogram_bins_put_seq_on_an_edge():
    bins = rendering.histogram_bins([1, 5, 50, 99, 100, 101, 300], seq=100)
    assert sum(c for _, _, c in bins) == 7
    assert all(hi <= 100 or lo > 100 for lo, hi, _ in bins)  # wholly kept or wholly cut
    assert [c for lo, hi, c in bins if lo > 100] and sum(c for lo, hi, c in bins if lo > 100) == 2
    for lo, hi, _ in bins:
        assert lo <= hi
    assert rendering.histogram_bins([], seq=10) == []


def test_pretokenized_without_a_tokenizer_shows_the_ids(model):
    report = report_data(model, [{"input_ids": [5, 6, 7]}], None, eval=0)
    assert "".join(s.text for s in report.records[0].segments).split() == ["5", "6", "7"]
    assert torch.equal(torch.tensor(report.records[0].input_ids), torch.tensor([5, 6, 7]))
