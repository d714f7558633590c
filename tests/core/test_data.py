"""Training data: every input kind → tokenized examples with exact label masks; eval splits; deterministic,
resumable batches; padding; packing (same loss as a padded batch); classification labels; every user mistake."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from chat_templates import GEN_TEMPLATE, PLAIN_TEMPLATE

from jupyter_lora.core.data import PreparedData, find_tokenizer, prepare_data
from jupyter_lora.core.errors import UsageError
from jupyter_lora.testing import tiny_model, tiny_tokenizer

EOS = 1

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture
def tok():
    return tiny_tokenizer()


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_spans(tokenizer, example: dict) -> list[str]:
    """The decoded runs of tokens whose label is not -100."""
    spans, run = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s) for s in spans]


class FakeDataset:
    """Duck-typed ``datasets.Dataset``: ``column_names``, ``features``, ``len``, indexing and iteration of dicts."""

    def __init__(self, columns: dict[str, list], features: dict | None = None):
        self._columns = columns
        self.column_names = list(columns)
        self.features = features or {}

    def __len__(self):
        return len(next(iter(self._columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self._columns.items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class FakeDatasetDict:
    column_names = {"train": ["text"], "test": ["text"]}  # noqa: RUF012


class FakeDataFrame:
    """Duck-typed ``pandas.DataFrame``: ``columns`` and ``to_dict("records")``."""

    def __init__(self, columns: dict[str, list]):
        self._columns = columns
        self.columns = list(columns)

    def to_dict(self, orient: str = "dict"):
        assert orient == "records"
        n = len(next(iter(self._columns.values())))
        return [{k: v[i] for k, v in self._columns.items()} for i in range(n)]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- format matrix

# (data factory, kwargs, chat template, n train examples, first example's full text, its trained spans)
LM_CASES = [
    (lambda p: ["hello", "abc"], {}, None, 2, "hello<eos>", ["hello<eos>"]),
    (lambda p: ["hello", "  ", ""], {}, None, 1, "hello<eos>", ["hello<eos>"]),
    (lambda p: ("ab", "cd"), {}, None, 2, "ab<eos>", ["ab<eos>"]),
    (lambda p: [{"text": "hi there"}], {}, None, 1, "hi there<eos>", ["hi there<eos>"]),
    (lambda p: [{"prompt": "Q:2+2? A:", "response": " 4"}], {}, None, 1, "Q:2+2? A: 4<eos>", [" 4<eos>"]),
    (lambda p: [{"prompt": "Say hi:", "completion": "hi"}], {}, None, 1, "Say hi:hi<eos>", ["hi<eos>"]),
    (
        lambda p: [{"instruction": "Add", "input": "2 2", "output": "=4"}],
        {},
        None,
        1,
        "Add\n2 2=4<eos>",
        ["=4<eos>"],
    ),
    (
        lambda p: [{"instruction": "Hi", "output": "!"}, {"instruction": "x", "output": ""}],
        {},
        None,
        1,
        "Hi!<eos>",
        ["!<eos>"],
    ),
    (
        lambda p: [{"question": "Why?", "answer": "Because"}],
        {},
        None,
        1,
        "Why?Because<eos>",
        ["Because<eos>"],
    ),
    (lambda p: [{"input": "in", "output": "out"}], {}, None, 1, "inout<eos>", ["out<eos>"]),
    (
        lambda p: [{"messages": CHAT}],
        {},
        GEN_TEMPLATE,
        1,
        "S:be brief|U:hi|A:hello<eos>|U:2+2?|A:4<eos>|",
        ["hello<eos>", "4<eos>"],
    ),
    (
        lambda p: [{"messages": CHAT}],
        {},
        PLAIN_TEMPLATE,
        1,
        "S:be brief|U:hi|A:hello<eos>|U:2+2?|A:4<eos>|",
        ["hello<eos>|", "4<eos>|"],
    ),
    (
        lambda p: [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
        {},
        PLAIN_TEMPLATE,
        1,
        "U:hi|A:yo<eos>|",
        ["yo<eos>|"],
    ),
    (
        lambda p: [CHAT, CHAT[1:3]],
        {},
        GEN_TEMPLATE,
        2,
        "S:be brief|U:hi|A:hello<eos>|U:2+2?|A:4<eos>|",
        ["hello<eos>", "4<eos>"],
    ),
    (lambda p: {"text": ["one", "two", "three"]}, {}, None, 3, "one<eos>", ["one<eos>"]),
    (lambda p: FakeDataset({"text": ["ab", "cd"], "id": [0, 1]}), {}, None, 2, "ab<eos>", ["ab<eos>"]),
    (
        lambda p: FakeDataFrame({"prompt": ["P:", "Q:", "R:"], "response": ["x", float("nan"), None]}),
        {},
        None,
        1,
        "P:x<eos>",
        ["x<eos>"],
    ),
    (
        lambda p: write(
            p / "d.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n'
        ),
        {},
        None,
        2,
        "ab<eos>",
        ["b<eos>"],
    ),
    (
        lambda p: write(p / "d.json", json.dumps([{"text": "x y"}, {"text": "z"}])),
        {},
        None,
        2,
        "x y<eos>",
        ["x y<eos>"],
    ),
    (
        lambda p: write(p / "d.json", json.dumps({"text": ["col", "umn"]})),
        {},
        None,
        2,
        "col<eos>",
        ["col<eos>"],
    ),
    (lambda p: Path(write(p / "d.csv", 'text,id\n"a, b",1\nc,2\n')), {}, None, 2, "a, b<eos>", ["a, b<eos>"]),
    (lambda p: write(p / "d.tsv", "prompt\tresponse\nq\tr\n"), {}, None, 1, "qr<eos>", ["r<eos>"]),
    (
        lambda p: write(p / "d.txt", "first line\n\n   \nsecond\n"),
        {},
        None,
        2,
        "first line<eos>",
        ["first line<eos>"],
    ),
    (
        lambda p: [{"body": "custom", "n": 1}],
        {"text_column": "body"},
        None,
        1,
        "custom<eos>",
        ["custom<eos>"],
    ),
    (lambda p: [{"text": "ends<eos>"}], {}, None, 1, "ends<eos>", ["ends<eos>"]),
]
LM_IDS = [
    "texts",
    "texts-empty-skipped",
    "tuple-of-texts",
    "text-records",
    "prompt-response",
    "prompt-completion",
    "instruction-input-output",
    "instruction-output-empty-skipped",
    "question-answer",
    "input-output",
    "messages-generation-template",
    "messages-prefix-template",
    "sharegpt-conversations",
    "list-of-conversations",
    "dict-of-columns",
    "dataset",
    "dataframe-nan-skipped",
    "jsonl",
    "json-records",
    "json-columns",
    "csv-pathlike",
    "tsv",
    "txt",
    "text-column",
    "no-double-eos",
]


@pytest.mark.parametrize(("make", "kwargs", "template", "n", "full", "spans"), LM_CASES, ids=LM_IDS)
def test_causal_lm_formats(tok, tmp_path, make, kwargs, template, n, full, spans):
    tok.chat_template = template
    data = prepare_data(make(tmp_path), tok, **kwargs)
    assert data.task == "CAUSAL_LM"
    assert len(data.train) == n
    assert data.eval is None
    assert data.label_names == ()
    first = data.train[0]
    assert first["input_ids"] == enc(tok, full)
    assert trained_spans(tok, first) == spans
    assert data.train_tokens == sum(len(ex["input_ids"]) for ex in data.train)


def test_prompt_response_labels_exact(tok):
    data = prepare_data([{"prompt": "Q:", "response": "ok"}], tok)
    prompt, response = enc(tok, "Q:"), enc(tok, "ok")
    assert data.train == [
        {"input_ids": prompt + response + [EOS], "labels": [-100] * len(prompt) + response + [EOS]}
    ]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # "S:be brief|U:hi|A:" (18) hello<eos> "|U:2+2?|A:" (10) 4<eos> "|"
        (GEN_TEMPLATE, "_" * 18 + "hello<eos>" + "_" * 10 + "4<eos>" + "_"),
        # the template's turn end "|" after the reply is trained too
        (PLAIN_TEMPLATE, "_" * 18 + "hello<eos>|" + "_" * 9 + "4<eos>|"),
    ],
    ids=["generation-mask", "prefix-lengths"],
)
def test_messages_labels_exact(tok, template, expected):
    tok.chat_template = template
    example = prepare_data([{"messages": CHAT}], tok).train[0]
    shown = "".join("_" if label == -100 else tok.decode([label]) for label in example["labels"])
    assert shown == expected


@pytest.mark.parametrize(
    ("records", "kwargs", "labels", "names"),
    [
        ([{"text": "good", "label": 1}, {"text": "bad", "label": 0}], {}, [1, 0], ("0", "1")),
        ([{"text": "a", "label": 2}], {}, [2], ("0", "1", "2")),
        ([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}], {}, [1, 0], ("neg", "pos")),
        (
            [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
            {"label2id": {"pos": 0, "neg": 1}},
            [0, 1],
            ("pos", "neg"),
        ),
        ([{"text": "x", "label": "b"}], {"label2id": ["a", "b", "c"]}, [1], ("a", "b", "c")),
        ([{"text": "x", "label": 1}], {"label2id": {"no": 0, "yes": 1}}, [1], ("no", "yes")),
        ([{"sentence": "s", "category": True}], {}, [1], ("0", "1")),
        ([{"review": "r", "label": 3.0}], {}, [3], ("0", "1", "2", "3")),
        ([{"body": "b", "y": "t"}], {"text_column": "body", "label_column": "y"}, [0], ("t",)),
    ],
    ids=[
        "int",
        "int-gap",
        "str-sorted",
        "str-label2id",
        "label2id-list",
        "int-with-label2id",
        "sentence-category-bool",
        "review-float",
        "explicit-columns",
    ],
)
def test_seq_cls_labels(tok, records, kwargs, labels, names):
    data = prepare_data(records, tok, task="SEQ_CLS", **kwargs)
    assert data.task == "SEQ_CLS"
    assert [ex["label"] for ex in data.train] == labels
    assert data.label_names == names
    assert data.train[0]["input_ids"] == enc(tok, next(v for v in records[0].values() if isinstance(v, str)))


@pytest.mark.parametrize(
    ("make", "labels", "names", "first_ids"),
    [
        (
            lambda p: write(p / "c.csv", "text,label\nab,10\ncd,2\n"),
            [10, 2],
            tuple(str(i) for i in range(11)),
            "ab",
        ),
        (
            lambda p: FakeDataset(
                {"text": ["t", "u"], "label": [0, 2]},
                features={"label": SimpleNamespace(names=["neg", "neutral", "pos"])},
            ),
            [0, 2],
            ("neg", "neutral", "pos"),
            "t",
        ),
        (
            lambda p: FakeDataFrame({"premise": ["p"], "hypothesis": ["h"], "label": ["yes"]}),
            [0],
            ("yes",),
            "ph",
        ),
        (lambda p: {"sentence1": ["a"], "sentence2": ["b"], "label": [0]}, [0], ("0",), "ab"),
    ],
    ids=["csv-digit-strings", "dataset-classlabel", "dataframe-text-pair", "columns-text-pair"],
)
def test_seq_cls_sources(tok, tmp_path, make, labels, names, first_ids):
    data = prepare_data(make(tmp_path), tok, task="classification")
    assert [ex["label"] for ex in data.train] == labels
    assert data.label_names == names
    assert data.train[0]["input_ids"] == enc(tok, first_ids)


def test_seq_cls_eval_data_shares_label_ids(tok):
    data = prepare_data(
        [{"text": "a", "label": "b"}, {"text": "c", "label": "c"}],
        tok,
        task="SEQ_CLS",
        eval_data=[{"text": "x", "label": "a"}],
    )
    assert data.label_names == ("a", "b", "c")
    assert [ex["label"] for ex in data.train] == [1, 2]
    assert [ex["label"] for ex in data.eval] == [0]


def test_seq_cls_collate(tok):
    data = prepare_data([{"text": "abc", "label": 1}, {"text": "a", "label": 0}], tok, task="SEQ_CLS")
    batch = data.collate(data.train)
    assert batch["input_ids"].tolist() == [enc(tok, "abc"), [*enc(tok, "a"), 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------- truncation


def test_truncation_counts_and_drops(tok):
    data = prepare_data(["abcdefgh", "ab", "abcdefghij"], tok, seq=4)  # two texts longer than seq
    assert [len(ex["input_ids"]) for ex in data.train] == [4, 3, 4]
    assert data.train[0]["input_ids"] == enc(tok, "abcd")
    assert data.train[0]["labels"] == data.train[0]["input_ids"]
    assert (data.truncated, data.dropped) == (2, 0)

    # A prompt that fills seq leaves nothing to learn: dropped (and counted as truncated, like the second one).
    pairs = [{"prompt": "long prompt", "response": "r"}, {"prompt": "p", "response": "resp"}]
    data = prepare_data(pairs, tok, seq=5)
    assert (len(data.train), data.truncated, data.dropped) == (1, 2, 1)
    assert trained_spans(tok, data.train[0]) == ["resp"]  # "p" + "resp" + eos is cut to 5: the eos goes

    data = prepare_data([{"text": "abcdef", "label": 0}], tok, task="SEQ_CLS", seq=3)
    assert data.train[0]["input_ids"] == enc(tok, "abc")
    assert data.truncated == 1


# ----------------------------------------------------------------------------------------------- eval split


@pytest.mark.parametrize(
    ("n", "eval", "expected"),
    [
        (99, None, 0),
        (100, None, 10),
        (250, "auto", 25),
        (6000, None, 500),
        (150, True, 15),
        (50, 0.2, 10),
        (10, 0.01, 1),
        (50, 3, 3),
        (150, 0, 0),
        (150, False, 0),
        (150, 0.0, 0),
        (150, "none", 0),
    ],
    ids=[
        "auto-below-100",
        "auto-100",
        "auto-250",
        "auto-capped-500",
        "true-is-auto",
        "fraction",
        "tiny-fraction-at-least-1",
        "count",
        "zero",
        "false",
        "zero-fraction",
        "none-string",
    ],
)
def test_eval_split_sizes(tok, n, eval, expected):
    texts = [f"t{i}" for i in range(n)]
    data = prepare_data(texts, tok, eval=eval)
    n_eval = len(data.eval) if data.eval else 0
    assert n_eval == expected
    assert len(data.train) == n - expected
    if expected:
        seen = [tuple(ex["input_ids"]) for ex in data.train + data.eval]
        assert len(set(seen)) == n  # disjoint and complete


def test_eval_split_is_deterministic_from_seed(tok):
    texts = [f"t{i}" for i in range(40)]

    def held(seed):
        return [ex["input_ids"] for ex in prepare_data(texts, tok, eval=8, seed=seed).eval]

    assert held(0) == held(0)
    assert held(0) != held(1)


def test_separate_eval_data(tok):
    data = prepare_data([f"t{i}" for i in range(200)], tok, eval_data=["e1", "e2", ""])
    assert len(data.train) == 200
    assert [ex["input_ids"] for ex in data.eval] == [enc(tok, "e1<eos>"), enc(tok, "e2<eos>")]


# ----------------------------------------------------------------------------------------------- batches


@pytest.fixture
def ten(tok):
    return prepare_data([chr(ord("a") + i) for i in range(10)], tok, eval=0)


def order(batches) -> list[list[str]]:
    return [[chr(row[0] - 3 + 32) for row in b["input_ids"].tolist()] for b in batches]


def test_batches_are_deterministic_and_resumable(ten):
    first = order(ten.batches("train", 3, epoch=0, seed=7))
    assert first == order(ten.batches("train", 3, epoch=0, seed=7))
    assert [len(b) for b in first] == [3, 3, 3, 1]  # the last partial batch is kept
    assert sorted(x for b in first for x in b) == list("abcdefghij")  # each example once per epoch
    assert first != order(ten.batches("train", 3, epoch=1, seed=7))
    assert first != order(ten.batches("train", 3, epoch=0, seed=8))
    assert order(ten.batches("train", 3, epoch=0, seed=7, start=2)) == first[2:]
    assert order(ten.batches("train", 3, epoch=0, seed=7, start=4)) == []
    assert order(ten.batches("train", 4, 0, 7, shuffle=False)) == [list("abcd"), list("efgh"), list("ij")]
    assert ten.num_batches("train", 3) == 4
    assert ten.num_batches("eval", 3) == 0
    assert list(ten.batches("eval", 3, 0, 0)) == []


def test_batch_order_is_randperm_of_seed_times_1000_plus_epoch(ten):
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1000 + 2)).tolist()
    got = [x for b in order(ten.batches("train", 4, epoch=2, seed=3)) for x in b]
    assert got == [chr(ord("a") + i) for i in expected]


def test_eval_batches_are_not_shuffled(tok):
    data = prepare_data(["x"], tok, eval_data=list("abcde"))
    assert order(data.batches("eval", 2, epoch=5, seed=5)) == [list("ab"), list("cd"), list("e")]
    assert data.num_batches("eval", 2) == 3


# ----------------------------------------------------------------------------------------------- padding


def test_dynamic_padding_and_masks(tok):
    data = prepare_data([{"prompt": "P", "response": "a"}, {"prompt": "", "response": "abcd"}], tok)
    batch = data.collate(data.train)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    p, a, abcd = enc(tok, "P"), enc(tok, "a"), enc(tok, "abcd")
    assert batch["input_ids"].tolist() == [[*p, *a, EOS, 0, 0], [*abcd, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, *a, EOS, -100, -100], [*abcd, EOS]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pads_with_eos_without_pad_token(tok):
    tok.pad_token = None
    data = prepare_data(["a", "abc"], tok)
    assert data.pad_token_id == EOS
    assert data.collate(data.train)["input_ids"][0].tolist() == [*enc(tok, "a"), EOS, EOS, EOS]


# ----------------------------------------------------------------------------------------------- packing

PACK_RECORDS = [
    {"prompt": "Q: hi ", "response": "hello there"},
    {"prompt": "2+2=", "response": "4"},
    {"prompt": "", "response": "the quick brown fox"},
    {"prompt": "name? ", "response": "Ada"},
]


def test_packed_batch_layout(tok):
    data = prepare_data(PACK_RECORDS[:2], tok, packing=True)
    batch = data.collate(data.train)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see forward_kwargs
    first, second = data.train
    n1, n2 = len(first["input_ids"]), len(second["input_ids"])
    assert batch["input_ids"].tolist() == [first["input_ids"] + second["input_ids"]]
    assert batch["position_ids"].tolist() == [list(range(n1)) + list(range(n2))]
    assert batch["labels"].tolist() == [[-100, *first["labels"][1:], -100, *second["labels"][1:]]]
    assert data.forward_kwargs == {"use_cache": False}


def test_packed_loss_equals_padded_loss(tok):
    """One padded batch averages the loss over all its label tokens; the packed row has the same label tokens,
    so with a block-diagonal attention mask the two losses agree."""
    model = tiny_model("llama")  # eval mode, sdpa
    assert model.config._attn_implementation == "sdpa"
    packed = prepare_data(PACK_RECORDS, tok, packing=True)
    padded = prepare_data(PACK_RECORDS, tok)
    with torch.no_grad():
        reference = model(**padded.collate(padded.train)).loss.item()
        loss = model(**packed.collate(packed.train), **packed.forward_kwargs).loss.item()
        # transformers derives the per-example mask from position_ids only when attention_mask and
        # past_key_values are None; with config.use_cache=True (the default) the model makes an empty
        # DynamicCache, the examples attend to each other and the loss differs. Hence forward_kwargs.
        leaky = model(**packed.collate(packed.train)).loss.item()
    assert loss == pytest.approx(reference, abs=1e-4)
    assert abs(leaky - reference) > 1e-4


def test_packed_batches_follow_the_same_order(tok):
    data = prepare_data([chr(ord("a") + i) for i in range(6)], tok, packing=True)
    plain = prepare_data([chr(ord("a") + i) for i in range(6)], tok)
    for packed_batch, plain_batch in zip(
        data.batches("train", 4, 1, 2), plain.batches("train", 4, 1, 2), strict=True
    ):
        ids = plain_batch["input_ids"][plain_batch["attention_mask"].bool()]
        assert packed_batch["input_ids"][0].tolist() == ids.tolist()


# ----------------------------------------------------------------------------------------------- misc


def test_repr_is_short(tok):
    data = prepare_data([{"text": "good", "label": "pos"}] * 3, tok, task="SEQ_CLS")
    text = repr(data)
    assert text == "PreparedData(task=SEQ_CLS, train=3 examples / 12 tokens, eval=0, labels=['pos'])"
    assert isinstance(data, PreparedData)


def test_find_tokenizer(tok, tmp_path):
    model = tiny_model("llama")
    model.config._name_or_path = "some-org/some-model"  # a hub name: never looked up
    assert find_tokenizer(model) is None
    model.config._name_or_path = str(tmp_path)  # a folder without tokenizer files
    assert find_tokenizer(model) is None
    model.config._name_or_path = str(tmp_path / "missing")
    assert find_tokenizer(model) is None
    tok.save_pretrained(tmp_path)
    model.config._name_or_path = str(tmp_path)
    found = find_tokenizer(model)
    assert found is not None
    assert found("abc")["input_ids"] == enc(tok, "abc")

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_tokenizer(wrapped)("a")["input_ids"] == enc(tok, "a")
    assert find_tokenizer(object()) is None


# ----------------------------------------------------------------------------------------------- mistakes


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _nothing(p):
    return None


ERROR_CASES: list[tuple[str, Any, dict, str]] = [
    ("empty-list", lambda p: [], {}, r"`data` is empty"),
    ("only-empty-texts", lambda p: ["", "  "], {}, r"only empty texts"),
    ("empty-records", lambda p: [{"text": ""}], {}, r"no non-empty example in the column\(s\) text"),
    (
        "no-known-columns",
        lambda p: [{"txt": "a", "n": 1}],
        {},
        r"columns `txt`, `n`.*`txt`: did you mean `text`\?",
    ),
    (
        "seq-cls-no-label",
        lambda p: [{"text": "a", "lbl": 1}],
        {"task": "SEQ_CLS"},
        r"no label column.*`label`",
    ),
    ("seq-cls-texts", lambda p: ["a", "b"], {"task": "SEQ_CLS"}, r"without labels"),
    (
        "seq-cls-missing-label",
        lambda p: [{"text": "a", "label": None}],
        {"task": "SEQ_CLS"},
        r"`data\[0\]` has no",
    ),
    (
        "label-not-in-label2id",
        lambda p: [{"text": "a", "label": "postive"}],
        {"task": "SEQ_CLS", "label2id": {"positive": 0, "negative": 1}},
        r"'postive'.*not in `label2id`.*Did you mean `positive`\?",
    ),
    ("negative-label", lambda p: [{"text": "a", "label": -1}], {"task": "SEQ_CLS"}, r"negative"),
    ("list-of-ints", lambda p: [1, 2, 3], {}, r"only strings .* found 3 int"),
    ("mixed-types", lambda p: ["a", {"text": "b"}], {}, r"found 1 str, 1 dict"),
    ("unsupported-object", lambda p: 42, {}, r"got int"),
    ("bytes", lambda p: b"abc", {}, r"bytes"),
    ("dict-not-columns", lambda p: {"text": "just one"}, {}, r"dict of equally long column lists"),
    ("non-str-text", lambda p: [{"text": 5}], {}, r"`data\[0\]\['text'\]` is int"),
    ("missing-file", lambda p: str(p / "nope.jsonl"), {}, r"`data` file not found: .*nope\.jsonl"),
    ("folder", lambda p: str(p), {}, r"is a folder"),
    (
        "bad-extension",
        lambda p: write(p / "d.jsonn", "{}"),
        {},
        r"extension '\.jsonn'.*Did you mean `\.json`",
    ),
    (
        "jsonl-parse",
        lambda p: write(p / "d.jsonl", '{"text": "a"}\n{"text": \n'),
        {},
        r"line 2 is not valid JSON",
    ),
    ("json-parse", lambda p: write(p / "d.json", '[{"text": "a"},'), {}, r"not valid JSON: .* line 1"),
    ("json-not-list", lambda p: write(p / "d.json", '"text"'), {}, r"must hold a JSON list"),
    ("csv-empty", lambda p: write(p / "d.csv", ""), {}, r"is empty: it needs a header row"),
    ("not-utf8", lambda p: write_bytes(p / "d.txt", b"\xff\xfe\x00a"), {}, r"not UTF-8"),
    (
        "datasetdict",
        lambda p: FakeDatasetDict(),
        {},
        r"DatasetDict.*data=ds\['train'\], eval_data=ds\['test'\]",
    ),
    (
        "no-tokenizer",
        lambda p: ["a"],
        {"tokenizer": None},
        r"`tokenizer` is missing: pass tokenizer=.*`tokenizer: VAR`",
    ),
    ("tokenizer-not-callable", lambda p: ["a"], {"tokenizer": "gpt2"}, r"`tokenizer` must be a transformers"),
    ("seq-zero", lambda p: ["a"], {"seq": 0}, r"`seq` must be a positive whole number; got 0"),
    ("seq-str", lambda p: ["a"], {"seq": "512"}, r"`seq` must be a positive whole number; got '512'"),
    ("seq-bool", lambda p: ["a"], {"seq": True}, r"`seq` must be a positive"),
    (
        "eval-fraction-one",
        lambda p: ["a"] * 10,
        {"eval": 1.0},
        r"`eval`=1\.0: a fraction must be in \[0, 1\)",
    ),
    ("eval-fraction-negative", lambda p: ["a"] * 10, {"eval": -0.1}, r"fraction must be in"),
    ("eval-negative-count", lambda p: ["a"] * 10, {"eval": -2}, r"cannot be negative"),
    ("eval-bad-string", lambda p: ["a"] * 10, {"eval": "lots"}, r"`eval` must be 'auto'"),
    (
        "eval-takes-all",
        lambda p: ["a"] * 10,
        {"eval": 10},
        r"holds out 10 of the 10 examples and leaves none",
    ),
    ("eval-fraction-takes-all", lambda p: ["a"] * 2, {"eval": 0.9}, r"leaves none for training"),
    (
        "eval-and-eval-data",
        lambda p: ["a"],
        {"eval": 0.1, "eval_data": ["b"]},
        r"`eval`=0\.1 and `eval_data` are both",
    ),
    ("eval-data-empty", lambda p: ["a"], {"eval_data": []}, r"`eval_data` is empty"),
    (
        "no-assistant-turn",
        lambda p: [{"messages": [{"role": "user", "content": "hi"}]}],
        {"template": PLAIN_TEMPLATE},
        r"`data\[0\]\['messages'\]` has no assistant turn \(roles: user\)",
    ),
    ("turn-without-role", lambda p: [{"messages": [{"text": "hi"}]}], {}, r"turn without a role"),
    ("no-chat-template", lambda p: [{"messages": CHAT}], {}, r"`tokenizer` has no chat template"),
    (
        "packing-seq-cls",
        lambda p: [{"text": "a", "label": 0}],
        {"task": "SEQ_CLS", "packing": True},
        r"`packing=True`",
    ),
    (
        "unknown-task",
        lambda p: ["a"],
        {"task": "SEQ_2_SEQ_LM"},
        r"prepared for CAUSAL_LM, SEQ_CLS, IMAGE_CLS, AUDIO_CLS, ASR only",
    ),
    ("misspelled-task", lambda p: ["a"], {"task": "casual_lm"}, r"`task_type` must be one of"),
    (
        "label-column-for-lm",
        lambda p: ["a"],
        {"label_column": "label"},
        r"`label_column`='label' is for SEQ_CLS",
    ),
    ("label2id-for-lm", lambda p: ["a"], {"label2id": {"a": 0}}, r"`label2id` is for SEQ_CLS"),
    (
        "bad-label2id",
        lambda p: [{"text": "a", "label": 0}],
        {"task": "SEQ_CLS", "label2id": {"a": -1}},
        r"ids 0, 1",
    ),
    ("text-column-typo", lambda p: [{"body": "a"}], {"text_column": "bdy"}, r"`text_column`='bdy'.*`body`"),
    (
        "label-column-typo",
        lambda p: [{"text": "a", "y": 1}],
        {"task": "SEQ_CLS", "label_column": "yy"},
        r"`label_column`='yy'.*Did you mean `y`",
    ),
    (
        "all-dropped",
        lambda p: [{"prompt": "long prompt", "response": "r"}],
        {"seq": 3},
        r"No training example is left",
    ),
    ("data-none", _nothing, {}, r"`data` is missing"),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "match"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_mistakes(tok, tmp_path, make, kwargs, match):
    kwargs = dict(kwargs)
    tok.chat_template = kwargs.pop("template", None)
    tokenizer = kwargs.pop("tokenizer", tok)
    with pytest.raises(UsageError, match=match) as info:
        prepare_data(make(tmp_path), tokenizer, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: list(d.batches("valid", 2, 0, 0)), r"`split` must be 'train' or 'eval'; got 'valid'"),
        (lambda d: d.num_batches("train", 0), r"`batch` must be a positive"),
        (lambda d: list(d.batches("train", 2, 0, 0, start=-1)), r"`start` must be a batch index"),
        (lambda d: d.collate([]), r"`examples` is empty"),
    ],
    ids=["bad-split", "bad-batch", "bad-start", "empty-collate"],
)
def test_batch_mistakes(ten, call, match):
    with pytest.raises(UsageError, match=match):
        call(ten)


def test_records_mixing_formats_are_refused_not_half_used():
    from jupyter_lora.core.data import prepare_data
    from jupyter_lora.testing import tiny_tokenizer

    data = [{"text": f"text number {i}"} for i in range(5)] + [
        {"prompt": f"p {i}", "response": f"r {i}"} for i in range(5)
    ]
    for records in (data, data[::-1]):
        with pytest.raises(
            UsageError, match=r"`data` mixes record formats: the records use .*, but record (0|5) uses"
        ):
            prepare_data(records, tiny_tokenizer(), task="CAUSAL_LM", seq=32, eval=0)
    # a missing value in the format's own column is still a skipped record (pandas writes NaN there)
    found = prepare_data([{"text": "a b"}, {"text": None}, {"text": "c d"}], tiny_tokenizer(), task="CAUSAL_LM",
                         seq=32, eval=0)  # fmt: skip
    assert len(found.train) == 2


def test_unknown_columns_advise_renaming_not_a_setting_that_does_not_exist():
    from jupyter_lora.core.data import prepare_data
    from jupyter_lora.testing import tiny_tokenizer

    with pytest.raises(
        UsageError, match=r"`txt`: did you mean `text`\? Rename the column to one of those"
    ) as info:
        prepare_data([{"txt": "a"}], tiny_tokenizer(), task="CAUSAL_LM", seq=32, eval=0)
    assert "text_column" not in str(info.value)
