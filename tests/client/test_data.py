"""Training data: JSONL parsing, label masking, truncation, fixed-size batches and client partitions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from edgesplit.client import data
from edgesplit.client.data import (
    IGNORE_INDEX,
    Batch,
    EncodedSet,
    Example,
    PromptFormat,
    SequenceLengths,
    dirichlet_partition,
    encode_examples,
    iid_partition,
    iterate_batches,
    load_tokenizer,
    pad_rows,
    read_jsonl,
    sequence_lengths,
)
from edgesplit.errors import ArtifactError, DataError

UNK, PAD, EOS, SEP = 0, 1, 2, 3
WORDS = "what is two plus three five hello world one four six seven eight nine ten".split()
VOCAB = {"[UNK]": UNK, "<pad>": PAD, "</s>": EOS, "###": SEP} | {word: 4 + i for i, word in enumerate(WORDS)}
# "###" is a word of its own to the tokenizer, so the separator shows up as exactly one token.
FORMAT = PromptFormat(separator=" ### ")


def tiny_tokenizer() -> Tokenizer:
    """A word-level tokenizer built in code: one token per word or punctuation run, no download."""
    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def ids(text: str) -> list[int]:
    return [VOCAB[word] for word in text.split()]


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- read_jsonl ---------------------------------------------------------------------------------------------


def test_reads_every_line_format(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            json.dumps({"prompt": "what is two plus three", "completion": "five"}),
            "",
            json.dumps({"context": "hello", "completion": "world", "id": 17}),  # extra keys are ignored
            "   ",
            json.dumps({"text": "one two three"}),
        ],
    )

    assert read_jsonl(path) == [
        Example(prompt="what is two plus three", completion="five"),
        Example(prompt="hello", completion="world"),
        Example(prompt=None, completion="one two three"),
    ]


def test_reads_a_byte_order_mark_and_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    # U+2028 is legal unescaped inside a JSON string; it must not end the line.
    lines = [json.dumps({"text": "a\u2028b"}, ensure_ascii=False), json.dumps({"text": "c"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))

    assert read_jsonl(path) == [Example(None, "a\u2028b"), Example(None, "c")]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ('["prompt", "completion"]', "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ('{"prompt": "a"}', "found keys: prompt"),
        ('{"completion": "a"}', "found keys: completion"),
        ('{"prompt": "a", "answer": "b"}', "found keys: answer, prompt"),
        ('{"prompt": "a", "context": "b", "completion": "c"}', "found keys: completion, context, prompt"),
        ('{"text": "a", "completion": "b"}', "found keys: completion, text"),
        ("{}", "found keys: none"),
        ('{"prompt": 3, "completion": "b"}', '"prompt" must be a string, got a number'),
        ('{"prompt": "a", "completion": null}', '"completion" must be a string, got null'),
        ('{"text": ["a"]}', '"text" must be a string, got an array'),
        ('{"text": ""}', '"text" is empty'),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    # Line 2 is blank and still counts: the number must match what an editor shows.
    path = write_lines(tmp_path, [json.dumps({"text": "hello"}), "", bad_line, json.dumps({"text": "world"})])

    with pytest.raises(DataError) as raised:
        read_jsonl(path)

    message = str(raised.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')

    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_a_file_without_examples_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(DataError, match=rf"^{path}: no examples"):
        read_jsonl(path)


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")


# --- encode_examples ----------------------------------------------------------------------------------------


def encode(examples: list[Example], max_seq_len: int, eos: int | None = EOS, pad: int = PAD) -> EncodedSet:
    return encode_examples(tiny_tokenizer(), examples, max_seq_len, eos, pad, prompt_format=FORMAT)


def test_prompt_and_padding_are_masked_and_completion_is_trained() -> None:
    encoded = encode([Example("what is two plus three", "five")], max_seq_len=10)

    prompt = ids("what is two plus three ###")  # the separator is part of the prompt
    completion = ids("five") + [EOS]
    padding = 10 - len(prompt) - len(completion)
    assert encoded.input_ids.tolist() == [prompt + completion + [PAD] * padding]
    assert encoded.attention_mask.tolist() == [[1] * (len(prompt) + len(completion)) + [0] * padding]
    assert encoded.labels.tolist() == [[IGNORE_INDEX] * len(prompt) + completion + [IGNORE_INDEX] * padding]
    assert (encoded.num_truncated, encoded.num_without_targets) == (0, 0)
    for array in (encoded.input_ids, encoded.attention_mask, encoded.labels):
        assert array.dtype == np.int64
        assert array.shape == (1, 10)


def test_text_examples_train_on_every_token() -> None:
    encoded = encode([Example(None, "hello world")], max_seq_len=5)

    assert encoded.labels.tolist() == [ids("hello world") + [EOS, IGNORE_INDEX, IGNORE_INDEX]]
    assert encoded.attention_mask.tolist() == [[1, 1, 1, 0, 0]]


def test_without_eos_nothing_is_appended() -> None:
    encoded = encode([Example("hello", "world")], max_seq_len=4, eos=None)

    assert encoded.input_ids.tolist() == [ids("hello ### world") + [PAD]]
    assert encoded.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, VOCAB["world"], IGNORE_INDEX]]


def test_eos_is_trained_even_when_it_is_also_the_pad_token() -> None:
    encoded = encode([Example("hello", "world")], max_seq_len=6, eos=EOS, pad=EOS)

    assert encoded.input_ids.tolist() == [ids("hello ### world") + [EOS, EOS, EOS]]
    assert encoded.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, VOCAB["world"], EOS] + [IGNORE_INDEX] * 2]


def test_truncation_from_the_right_is_counted_and_examples_are_kept() -> None:
    examples = [
        Example("hello", "one two three four five"),  # completion cut short
        Example("what is two plus three", "five"),  # the prompt alone fills the row: nothing left to train
        Example(None, "hello"),  # fits
    ]

    encoded = encode(examples, max_seq_len=4)

    assert len(encoded) == 3
    assert encoded.input_ids[0].tolist() == ids("hello ### one two")
    assert encoded.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + ids("one two")
    assert encoded.input_ids[1].tolist() == ids("what is two plus")
    assert encoded.labels[1].tolist() == [IGNORE_INDEX] * 4
    assert encoded.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert encoded.num_truncated == 2
    assert encoded.num_without_targets == 1


@pytest.mark.parametrize("max_seq_len", [2, 3, 4, 6, 9])
def test_sequence_lengths_count_what_encoding_cuts(max_seq_len: int) -> None:
    examples = [
        Example("hello", "one two three four five"),
        Example("what is two plus three", "five"),
        Example(None, "hello"),
    ]
    lengths = sequence_lengths(tiny_tokenizer(), examples, EOS, FORMAT)
    encoded = encode(examples, max_seq_len=max_seq_len)

    assert lengths.total == (8, 8, 2)  # context + completion + EOS
    assert lengths.truncated(max_seq_len) == encoded.num_truncated
    assert lengths.without_targets(max_seq_len) == encoded.num_without_targets


def test_the_window_fitting_most_examples_is_a_multiple_of_its_step() -> None:
    lengths = SequenceLengths(context=(1,) * 20, total=(10,) * 18 + (40, 300))

    assert lengths.window_fitting(0.95, 16) == 48  # 19 of 20 examples: up to 40 tokens
    assert lengths.window_fitting(0.90, 16) == 16
    assert lengths.window_fitting(1.0, 16) == 304
    with pytest.raises(DataError, match="no examples"):
        SequenceLengths((), ()).window_fitting()
    with pytest.raises(DataError, match="at most its total"):
        SequenceLengths(context=(5,), total=(4,))


def test_tokenizer_padding_and_truncation_settings_are_ignored_and_left_alone() -> None:
    configured = tiny_tokenizer()
    configured.enable_truncation(max_length=2)
    configured.enable_padding(pad_id=PAD, pad_token="<pad>", length=8)
    examples = [Example("what is two plus three", "five")]

    encoded = encode_examples(configured, examples, 10, EOS, PAD, prompt_format=FORMAT)

    assert encoded.input_ids.tolist() == encode(examples, max_seq_len=10).input_ids.tolist()
    assert configured.truncation is not None and configured.padding is not None


def test_an_example_without_tokens_is_an_error() -> None:
    with pytest.raises(DataError, match="example 1"):
        encode([Example(None, "hello"), Example(None, "   ")], max_seq_len=4, eos=None)


@pytest.mark.parametrize(("max_seq_len", "eos", "pad"), [(0, EOS, PAD), (4, -1, PAD), (4, EOS, -1)])
def test_invalid_encoding_arguments(max_seq_len: int, eos: int, pad: int) -> None:
    with pytest.raises(DataError):
        encode([Example(None, "hello")], max_seq_len, eos, pad)


def test_prompt_format_text_joins_prompt_separator_and_completion() -> None:
    assert PromptFormat().text(Example("Q: hi", "A: hello")) == "Q: hi\nA: hello"
    assert PromptFormat().text(Example(None, "plain")) == "plain"


# --- load_tokenizer and pad_rows ---------------------------------------------------------------------------


def test_the_artifacts_tokenizer_loads_without_padding_or_truncation(tmp_path: Path) -> None:
    saved = tiny_tokenizer()
    saved.enable_padding(pad_id=PAD, pad_token="<pad>", length=8)
    saved.enable_truncation(max_length=2)
    saved.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert tokenizer.encode("what is two plus three").ids == ids("what is two plus three")


def test_a_missing_or_broken_tokenizer_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read the tokenizer"):
        load_tokenizer(tmp_path)


def test_rows_are_padded_on_the_right_and_filler_rows_attend_one_pad_token() -> None:
    padded = pad_rows([[5, 6, 7], [8]], max_seq_len=4, pad_token_id=PAD, batch_size=3)
    assert padded.input_ids.tolist() == [[5, 6, 7, PAD], [8, PAD, PAD, PAD], [PAD] * 4]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert padded.lengths.tolist() == [3, 1, 1]
    assert padded.input_ids.dtype == padded.attention_mask.dtype == np.int64


@pytest.mark.parametrize(
    ("rows", "batch_size", "message"),
    [([[1, 2, 3, 4, 5]], None, "row 0 holds 5 tokens"), ([[]], None, "row 0 holds 0"), ([[1], [2]], 1, "2 rows")],
)
def test_rows_that_do_not_fit_are_refused(rows: list[list[int]], batch_size: int | None, message: str) -> None:
    with pytest.raises(DataError, match=message):
        pad_rows(rows, max_seq_len=4, pad_token_id=PAD, batch_size=batch_size)


# --- iterate_batches ----------------------------------------------------------------------------------------


def ten_examples() -> EncodedSet:
    return encode([Example(None, " ".join(WORDS[: i + 1])) for i in range(10)], max_seq_len=12)


def take(encoded: EncodedSet, count: int, batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    batches = iterate_batches(encoded, batch_size, seed, epoch_shuffle=shuffle)
    return [next(batches).indices.tolist() for _ in range(count)]


def test_batches_are_full_and_carry_their_rows() -> None:
    encoded = ten_examples()
    batches = iterate_batches(encoded, batch_size=4, seed=0)

    for batch in (next(batches) for _ in range(6)):
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (4, 12)
        np.testing.assert_array_equal(batch.input_ids, encoded.input_ids[batch.indices])
        np.testing.assert_array_equal(batch.labels, encoded.labels[batch.indices])
        np.testing.assert_array_equal(batch.attention_mask, encoded.attention_mask[batch.indices])


def test_every_epoch_visits_every_example_once_and_batches_straddle_epochs() -> None:
    # 10 examples in batches of 4: the third batch takes 2 from epoch 1 and 2 from epoch 2.
    indices = [i for batch in take(ten_examples(), count=5, batch_size=4, seed=3) for i in batch]

    assert sorted(indices[:10]) == list(range(10))
    assert sorted(indices[10:]) == list(range(10))
    assert indices[:10] != indices[10:]  # a fresh order each epoch


def test_batches_are_deterministic_given_the_seed() -> None:
    encoded = ten_examples()

    assert take(encoded, 7, 4, seed=11) == take(encoded, 7, 4, seed=11)
    assert take(encoded, 7, 4, seed=11) != take(encoded, 7, 4, seed=12)


def test_without_shuffling_batches_follow_file_order() -> None:
    assert take(ten_examples(), 3, 4, seed=0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_a_batch_larger_than_the_data_repeats_examples() -> None:
    tiny = encode([Example(None, "hello"), Example(None, "world")], max_seq_len=3)

    batch = next(iterate_batches(tiny, batch_size=5, seed=0))

    assert batch.input_ids.shape == (5, 3)
    assert set(batch.indices.tolist()) == {0, 1}


def test_invalid_batch_arguments_fail_at_the_call() -> None:
    with pytest.raises(DataError, match="batch_size"):
        iterate_batches(ten_examples(), batch_size=0, seed=0)
    empty = encode([], max_seq_len=4)
    assert empty.input_ids.shape == (0, 4)
    with pytest.raises(DataError, match="empty"):
        iterate_batches(empty, batch_size=2, seed=0)


def varied_lengths(count: int, seed: int = 0) -> EncodedSet:
    """`count` examples of 1 to 100 tokens, uniformly: random batches of them are mostly padding."""
    lengths = np.random.default_rng(seed).integers(1, 101, count)
    mask = (np.arange(100)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, 7, PAD).astype(np.int64)
    return EncodedSet(ids, mask, np.where(mask == 1, ids, IGNORE_INDEX), 0, 0)


def real_share(batches: list[Batch]) -> float:
    """Real tokens over the tokens a head computes that cuts each batch to its longest row."""
    real = sum(int(b.attention_mask.sum()) for b in batches)
    computed = sum(len(b.indices) * (int(np.flatnonzero(b.attention_mask.any(axis=0))[-1]) + 1) for b in batches)
    return real / computed


def test_grouping_by_length_sees_every_example_once_an_epoch_and_computes_little_padding() -> None:
    encoded = varied_lengths(450)  # 112 full batches of 4 and 2 examples over: two groups of 200 and one of 50
    grouped = list(itertools.islice(iterate_batches(encoded, 4, seed=5, group_by_length=True), 113))
    plain = list(itertools.islice(iterate_batches(encoded, 4, seed=5), 113))

    first_epoch = [int(i) for batch in grouped for i in batch.indices][:450]
    assert sorted(first_epoch) == list(range(450))  # the epoch's last 2 open the 113th batch
    assert real_share(grouped[:112]) > 0.95 > 0.8 > real_share(plain[:112])
    longest = [int(b.attention_mask.sum(axis=1).max()) for b in grouped[:112]]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)  # the batches are shuffled
    for batch in grouped[:112]:  # every batch is the rows it names
        np.testing.assert_array_equal(batch.attention_mask, encoded.attention_mask[batch.indices])


def test_grouping_by_length_bands_keep_a_small_sets_batches_changing_from_epoch_to_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded = varied_lengths(60)  # a device's small data set: 15 batches an epoch

    def distinct_batches() -> int:
        batches = itertools.islice(iterate_batches(encoded, 4, seed=0, group_by_length=True), 75)  # 5 epochs
        return len({frozenset(batch.indices.tolist()) for batch in batches})

    banded = distinct_batches()
    monkeypatch.setattr(data, "LENGTH_GROUP_BAND", 1)  # an exact sort: the same neighbours every epoch
    assert distinct_batches() < banded


def test_grouping_by_length_is_deterministic_given_the_seed_and_needs_shuffling() -> None:
    encoded = varied_lengths(60)

    def indices(seed: int) -> list[list[int]]:
        batches = iterate_batches(encoded, 4, seed=seed, group_by_length=True)
        return [next(batches).indices.tolist() for _ in range(40)]  # past the first epoch

    assert indices(3) == indices(3) and indices(3) != indices(4)
    with pytest.raises(DataError, match="needs epoch_shuffle"):
        iterate_batches(encoded, 4, seed=0, epoch_shuffle=False, group_by_length=True)


# --- partitions ---------------------------------------------------------------------------------------------


def assert_exact_cover(parts: list[list[int]], num_examples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(parts), "every client must get at least one example"
    assert sorted(i for part in parts for i in part) == list(range(num_examples))


@settings(max_examples=100, deadline=None)
@given(
    num_examples=st.integers(min_value=1, max_value=300),
    data=st.data(),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_iid_partition_covers_every_index_once_in_balanced_parts(
    num_examples: int, data: st.DataObject, seed: int
) -> None:
    num_clients = data.draw(st.integers(min_value=1, max_value=num_examples))

    parts = iid_partition(num_examples, num_clients, seed)

    assert_exact_cover(parts, num_examples, num_clients)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@settings(max_examples=100, deadline=None)
@given(
    groups=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=300),
    data=st.data(),
    alpha=st.floats(min_value=1e-3, max_value=1e3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_dirichlet_partition_covers_every_index_once(
    groups: list[int], data: st.DataObject, alpha: float, seed: int
) -> None:
    num_clients = data.draw(st.integers(min_value=1, max_value=min(len(groups), 20)))

    parts = dirichlet_partition(groups, num_clients, alpha, seed)

    assert_exact_cover(parts, len(groups), num_clients)
    assert parts == dirichlet_partition(groups, num_clients, alpha, seed)


def test_small_alpha_skews_groups_and_large_alpha_mixes_them() -> None:
    groups = [i % 10 for i in range(2000)]

    def mean_share_of_main_group(alpha: float) -> float:
        parts = dirichlet_partition(groups, num_clients=10, alpha=alpha, seed=0)
        return float(np.mean([np.bincount([groups[i] for i in part]).max() / len(part) for part in parts]))

    # 10 equal groups: an IID client's largest group is about 1/10 of its data.
    assert mean_share_of_main_group(0.05) > 0.5
    assert mean_share_of_main_group(1000.0) < 0.15


def test_partitions_are_seeded() -> None:
    groups = [i % 4 for i in range(100)]

    assert iid_partition(100, 5, seed=1) != iid_partition(100, 5, seed=2)
    assert dirichlet_partition(groups, 5, 0.5, seed=1) != dirichlet_partition(groups, 5, 0.5, seed=2)


def test_partition_errors() -> None:
    with pytest.raises(DataError, match="only 3"):
        dirichlet_partition([0, 1, 0], num_clients=4, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="only 2"):
        iid_partition(2, num_clients=3, seed=0)
    with pytest.raises(DataError, match="num_clients"):
        iid_partition(5, num_clients=0, seed=0)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataError, match="alpha"):
            dirichlet_partition([0, 1, 2], num_clients=2, alpha=alpha, seed=0)
