"""fedlora_cli.data.formats and .conversations: the ecosystem's instruction-data layouts (TRL's messages and
prompt/completion, Alpaca), detected from the columns; multi-turn conversations masked turn by turn through a
chat template (checked token by token with a one-character-per-token tokenizer built here); partition keeping
each layout in its shards; bad rows refused in one line."""

from __future__ import annotations

import json
import string

import pandas as pd
import pytest

from fedlora_cli import recipe as recipes
from fedlora_cli.data import formats
from fedlora_cli.data.conversations import Conversations
from fedlora_cli.data.examples import IGNORE_INDEX, PromptResponses, encode, read_examples
from fedlora_cli.data.partition import partition
from fedlora_cli.errors import FedloraError

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's shape: a default system turn when the conversation has none, <|im_end|> and a newline after each turn.
TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou help.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that rewrites an earlier assistant turn once the conversation goes on (as templates that drop
# earlier reasoning do): no exact boundary exists.
REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}...{% else %}"
    "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tok():
    """One token per character (and one per special marker), so every boundary is visible in the ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(string.printable)))}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    inner.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIALS[2:])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def runs(tok, batch, row: int = 0) -> list[tuple[str, bool]]:
    """The row's real tokens as maximal runs of text with a loss (True) or without, decoded."""
    ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
    labels = batch["labels"][row][: len(ids)].tolist()
    assert all(label in (IGNORE_INDEX, t) for label, t in zip(labels, ids)), "a label is its own token or none"
    out: list[tuple[list[int], bool]] = []
    for t, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0].append(t)
        else:
            out.append(([t], trained))
    return [(tok.decode(piece), trained) for piece, trained in out]


def test_every_assistant_turn_and_nothing_else_carries_a_loss(tok):
    batch = encode(tok, Conversations([CHAT], [0]), [0], 512)
    assert runs(tok, batch) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>", True),  # the turn and its end marker: the model learns to stop
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
    ]
    # The ids are the template's own rendering (its trailing newline, after the last loss, left out).
    assert tok.decode(batch["input_ids"][0]) == tok.apply_chat_template(CHAT, tokenize=False).rstrip()


def test_a_system_turn_the_template_adds_and_turns_after_the_last_answer_are_context_or_dropped(tok):
    chat = CHAT[1:] + [{"role": "user", "content": "Thanks"}]
    got = runs(tok, encode(tok, Conversations([chat], [0]), [0], 512))
    assert got[0] == ("<|im_start|>system\nYou help.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                      False)
    assert got[-1] == ("4<|im_end|>", True), "a trailing user turn carries no loss, so it is not encoded"


def test_a_conversational_prompt_completion_learns_the_completion_only(tok):
    frame = pd.DataFrame({"prompt": [CHAT[:4]], "completion": [CHAT[4:]]})
    examples = formats.FORMATS["prompt-completion"].read(frame, recipes.DataSection(), "data")
    assert [text for text, trained in runs(tok, encode(tok, examples, [0], 512)) if trained] == ["4<|im_end|>"]


def test_truncation_cuts_the_end_and_a_too_long_context_loses_its_beginning(tok):
    full = int(encode(tok, Conversations([CHAT], [0]), [0], 512)["attention_mask"].sum())
    cut = runs(tok, encode(tok, Conversations([CHAT], [0]), [0], full - 1))
    assert cut[-1] == ("4", True) and cut[1] == ("Hello<|im_end|>", True), "the last token goes"
    assert runs(tok, encode(tok, Conversations([CHAT], [0]), [0], full - 3))[-1][1] is False, "and a whole answer"
    # 12 tokens: the context before the first answer loses its beginning, leaving 11 of it and 1 answer token.
    short = runs(tok, encode(tok, Conversations([CHAT], [0]), [0], 12))
    assert short == [("<|im_start|>assistant\n", False), ("H", True)]


def test_generation_continues_the_context_of_the_last_answer_which_is_the_reference(tok):
    examples = Conversations([CHAT], [0])
    assert tok.decode(examples.prompt_ids(tok, 0)) == tok.apply_chat_template(CHAT[:4], tokenize=False,
                                                                             add_generation_prompt=True)
    assert examples.reference(0) == "4"


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tok):
    rewriting = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    rewriting.chat_template = REWRITING
    with pytest.raises(FedloraError, match="conversation 1 turn by turn"):
        encode(rewriting, Conversations([CHAT], [0]), [0], 512)
    rewriting.chat_template = None
    with pytest.raises(FedloraError, match="need a chat template"):
        encode(rewriting, Conversations([CHAT], [0]), [0], 512)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages", "prompt", "response"], "messages"),
        (["prompt", "response", "category"], "prompt-response"),
        (["prompt", "completion"], "prompt-completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
    ],
)
def test_auto_picks_the_layout_the_columns_show(columns, expected):
    assert formats.resolve(columns, recipes.DataSection(), "d").name == expected


def test_a_named_layout_wins_and_no_match_is_one_line():
    named = recipes.DataSection(format="prompt-response", prompt_column="q", response_column="a")
    assert formats.resolve(["messages", "q", "a"], named, "d").name == "prompt-response"
    with pytest.raises(FedloraError, match=r"match no causal-lm data format \(messages: messages; prompt-response"):
        formats.resolve(["text", "label"], recipes.DataSection(), "d")


def test_alpaca_rows_are_a_user_turn_or_alpacas_own_prompt():
    assert formats.alpaca_prompt("Add 2 and 3.", "", True) == "Add 2 and 3."
    assert formats.alpaca_prompt("Add these.", "2, 3", True) == "Add these.\n\n2, 3"
    plain = formats.alpaca_prompt("Add these.", "2, 3", False)
    assert plain.startswith("Below is an instruction that describes a task, paired with an input")
    assert plain.endswith("### Instruction:\nAdd these.\n\n### Input:\n2, 3\n\n### Response:\n")
    assert "### Input" not in formats.alpaca_prompt("Add 2 and 3.", "", False)


def test_prompt_completion_strings_are_prompt_response_pairs_and_mixed_rows_are_refused():
    frame = pd.DataFrame({"prompt": ["Q1", "Q2"], "completion": ["A1", "A2"]})
    got = formats.FORMATS["prompt-completion"].read(frame, recipes.DataSection(chat_template=True), "d")
    assert isinstance(got, PromptResponses) and got.responses == ["A1", "A2"] and got.chat_template
    mixed = pd.DataFrame({"prompt": ["Q1", CHAT[:2]], "completion": ["A1", CHAT[2:3]]})
    with pytest.raises(FedloraError, match="all strings or all lists of turns"):
        formats.FORMATS["prompt-completion"].read(mixed, recipes.DataSection(), "d")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "text that is not JSON"),
        ({"role": "user", "content": "x"}, "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "user"}], "turn 1 needs a text 'role' and 'content'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "turn 2 needs"),
        ([{"from": "human", "value": "x"}], "turn 1 needs"),
        ([{"role": "user", "content": "x"}], "has no 'assistant' turn"),
    ],
)
def test_bad_conversations_are_refused_in_one_line(value, message):
    with pytest.raises(FedloraError, match=message):
        formats.FORMATS["messages"].read(pd.DataFrame({"messages": [CHAT, value]}), recipes.DataSection(), "d.jsonl")


def chats(n: int) -> pd.DataFrame:
    rows = []
    for k in range(n):
        turns = [{"role": "user", "content": f"What is {k} + 1?"}, {"role": "assistant", "content": str(k + 1)}]
        if k % 2:
            turns += [{"role": "user", "content": "Double it."}, {"role": "assistant", "content": str(2 * k + 2)}]
        rows.append({"messages": turns, "topic": ["short", "long"][k % 2]})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_partition_keeps_the_conversations_and_a_shard_reads_back_as_its_rows(kind, tmp_path):
    source = tmp_path / f"chats.{kind}"
    frame = chats(40)
    if kind == "jsonl":
        frame.to_json(source, orient="records", lines=True)
    elif kind == "parquet":
        frame.to_parquet(source)
    else:
        frame.assign(messages=[json.dumps(m) for m in frame["messages"]]).to_csv(source, index=False)
    spec = recipes.DataSection(source=str(source), strategy="dirichlet", by="topic", alpha=1.0, test_fraction=0.25)
    result = partition(spec, 2, tmp_path / "data", task="causal-lm")
    assert result.manifest["format"] == "messages" and result.manifest["label_names"] == ["long", "short"]
    expected = {json.dumps(m) for m in frame["messages"]}
    seen = set()
    for shard in ["client-0.parquet", "client-1.parquet", "test.parquet", "validation.parquet"]:
        examples = read_examples(tmp_path / "data" / shard, spec, "causal-lm", None)
        assert isinstance(examples, Conversations)
        seen |= {json.dumps(m) for m in examples.messages}
    assert seen == expected, "every conversation reaches one shard, turn for turn"


def test_alpaca_without_an_input_column_partitions_and_reads_with_empty_inputs(tmp_path):
    source = tmp_path / "alpaca.jsonl"
    pd.DataFrame({"instruction": [f"Say {k}." for k in range(20)], "output": [str(k) for k in range(20)]}).to_json(
        source, orient="records", lines=True)
    spec = recipes.DataSection(source=str(source), chat_template=True)
    assert partition(spec, 2, tmp_path / "data", task="causal-lm").manifest["format"] == "alpaca"
    examples = read_examples(tmp_path / "data" / "client-0.parquet", spec, "causal-lm", None)
    assert examples.prompts[0].startswith("Say ") and examples.prompts[0].endswith(".")
