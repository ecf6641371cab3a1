"""Training data for the edge client: JSONL examples to fixed-shape token batches, and client partitions.

Only `tokenizers` and numpy, never torch or transformers: this runs on the device.

    load_tokenizer       artifact dir -> Tokenizer   its tokenizer.json, padding and truncation off
    read_jsonl           file -> [Example]           every line is checked before anything is returned
    encode_examples      [Example] -> EncodedSet     input_ids, attention_mask, labels: (N, T) int64
    pad_rows             token rows -> PaddedRows    (B, T) ids and attention mask, padded on the right
    iterate_batches      EncodedSet -> Batch, ...    (B, T) each, forever, every batch full; optionally
                                                     grouped by length (examples of like length together)
    fit_to_bucket        Batch -> Batch              (B, T') for T' the shortest sequence length that holds it
    iid_partition        example count -> one list of example indices per client
    dirichlet_partition  group labels -> non-IID lists of example indices per client

Labels follow the Hugging Face convention: aligned with input_ids (not shifted; the server's loss shifts),
IGNORE_INDEX wherever the model is not trained to predict the token (prompt and padding).
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tokenizers import Tokenizer

from edgesplit.errors import ArtifactError, DataError

# The label PyTorch's cross-entropy (and so the server's loss) skips.
IGNORE_INDEX = -100
# Length grouping sorts each run of this many batches' examples by length (as transformers' length-grouped
# sampler does with its default megabatch of 50 batches): batches of like length, still a random mix.
LENGTH_GROUP_BATCHES = 50
# ... by their length in bands of this many tokens, in random order within a band: on a device's small data set
# an exact sort would put the same examples together every epoch (60 E2E examples: 51 distinct batches of 75
# over 5 epochs; 71 with bands of 4), for a little padding (E2E: 97.6% of the computed tokens real, not 99.0%).
LENGTH_GROUP_BAND = 4

_EXPECTED_LINE = '{"prompt": str, "completion": str}, {"context": str, "completion": str} or {"text": str}'
# Accepted combinations of the recognised keys -> which key holds the prompt (None: a plain text example).
# Other keys (ids, metadata) are ignored, so that existing datasets load without rewriting.
_LINE_FORMS: dict[frozenset[str], str | None] = {
    frozenset({"prompt", "completion"}): "prompt",
    frozenset({"context", "completion"}): "context",
    frozenset({"text"}): None,
}
_RECOGNISED_KEYS = frozenset({"prompt", "context", "completion", "text"})


def load_tokenizer(artifact_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of an artifact directory (its tokenizer.json), without padding or truncation settings.

    Every reader of the artifacts opens the tokenizer here, so that training, evaluation and generation
    tokenize alike. Raises ArtifactError if the file is missing or unreadable.
    """
    path = Path(artifact_dir) / "tokenizer.json"
    if not path.is_file():
        raise ArtifactError(f"{path}: no tokenizer; the artifact directory is incomplete, export it again")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for every kind of bad file
        raise ArtifactError(f"{path}: cannot read the tokenizer: {error}") from None
    return _without_padding_or_truncation(tokenizer)


@dataclass(frozen=True)
class Example:
    """One training example. `prompt` is None for plain text, where every token is trained on."""

    prompt: str | None
    completion: str


def read_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read one example per line; blank lines are skipped.

    Raises DataError naming the file and 1-based line of the first malformed line, or the file if it holds
    no example at all. The whole file is parsed before returning, so training never starts on half a file.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read training data: {error.strerror or error}") from error
    # Editors on Windows often save UTF-8 with a byte-order mark, which json.loads rejects.
    content = content.removeprefix(codecs.BOM_UTF8)

    examples: list[Example] = []
    # Split on b"\n" only: str.splitlines would also split on U+2028 and friends, which JSON allows
    # unescaped inside strings, and would then misreport line numbers.
    for line_number, raw_line in enumerate(content.split(b"\n"), start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line)") from None
        if line.strip():
            examples.append(_parse_line(where, line))
    if not examples:
        raise DataError(f"{path}: no examples in the file; expected one JSON object per line: {_EXPECTED_LINE}")
    return examples


def _parse_line(where: str, line: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
            f"expected one object per line: {_EXPECTED_LINE}"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object ({_EXPECTED_LINE}), got {_json_type(record)}")
    form = frozenset(record) & _RECOGNISED_KEYS
    if form not in _LINE_FORMS:
        found = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: expected {_EXPECTED_LINE}; found keys: {found}")
    for key in sorted(form):
        if not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {_json_type(record[key])}')
    prompt_key = _LINE_FORMS[form]
    target_key = "text" if prompt_key is None else "completion"
    if not record[target_key]:
        raise DataError(f'{where}: "{target_key}" is empty; there is nothing to train on')
    return Example(prompt=None if prompt_key is None else record[prompt_key], completion=record[target_key])


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


@dataclass(frozen=True)
class PromptFormat:
    """How an example becomes text: prompt + separator + completion (+ EOS, added by `encode_examples`).

    The separator belongs to the prompt side, so it is context and never a training target.
    """

    separator: str = "\n"

    def context_and_target(self, example: Example) -> tuple[str, str]:
        """The part the model reads without being trained on it, and the part it is trained to produce."""
        if example.prompt is None:
            return "", example.completion
        return example.prompt + self.separator, example.completion

    def text(self, example: Example) -> str:
        """The whole example as one string, e.g. to show it or to prompt the model at inference."""
        context, target = self.context_and_target(example)
        return context + target


DEFAULT_PROMPT_FORMAT = PromptFormat()


@dataclass(frozen=True)
class EncodedSet:
    """A tokenized training set, padded on the right to the length the ONNX head was traced for."""

    input_ids: NDArray[np.int64]  # (N, T), pad_token_id after each example's tokens
    attention_mask: NDArray[np.int64]  # (N, T), 1 for the example's tokens then 0 for padding
    labels: NDArray[np.int64]  # (N, T), input_ids where trained on, IGNORE_INDEX elsewhere; not shifted
    num_truncated: int  # examples longer than T, cut on the right
    num_without_targets: int  # no trained token left (truncated away); these add nothing to the loss

    def __post_init__(self) -> None:
        for name in ("input_ids", "attention_mask", "labels"):
            array = getattr(self, name)
            if array.ndim != 2 or array.shape != self.input_ids.shape or array.dtype != np.int64:
                raise DataError(
                    f"EncodedSet.{name} must be int64 with shape {self.input_ids.shape}, "
                    f"got {array.dtype} {array.shape}"
                )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def encode_examples(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    max_seq_len: int,
    eos_token_id: int | None,
    pad_token_id: int,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
) -> EncodedSet:
    """Tokenize `examples` into (N, max_seq_len) arrays.

    Context (prompt + separator) and target (completion) are tokenized separately, without special tokens,
    so the boundary between masked and trained tokens is exact. `eos_token_id`, if given, follows the
    target and is trained on, so the model learns to stop. Sequences longer than `max_seq_len` are cut on
    the right; the count is reported in `num_truncated`.
    """
    if max_seq_len < 1:
        raise DataError(f"max_seq_len must be at least 1, got {max_seq_len}")
    if pad_token_id < 0:
        raise DataError(f"pad_token_id must be >= 0, got {pad_token_id}")
    if eos_token_id is not None and eos_token_id < 0:
        raise DataError(f"eos_token_id must be >= 0 or None, got {eos_token_id}")

    tokenizer = _without_padding_or_truncation(tokenizer)
    parts = [prompt_format.context_and_target(example) for example in examples]
    context_ids = _encode_all(tokenizer, [context for context, _ in parts])
    target_ids = _encode_all(tokenizer, [target for _, target in parts])
    eos = [] if eos_token_id is None else [eos_token_id]

    rows: list[list[int]] = []
    num_truncated = 0
    for row, (context, target) in enumerate(zip(context_ids, target_ids, strict=True)):
        tokens = context + target + eos
        if not tokens:
            raise DataError(f"example {row} (0-based) tokenizes to no tokens at all")
        num_truncated += len(tokens) > max_seq_len
        rows.append(tokens[:max_seq_len])
    padded = pad_rows(rows, max_seq_len, pad_token_id)
    # Labels come from positions, not from comparing ids with pad_token_id: many models pad with their EOS
    # id, and the EOS that ends a completion must still be trained on.
    labels = np.full(padded.input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    num_without_targets = 0
    for row, context in enumerate(context_ids):
        length = int(padded.lengths[row])
        first_target = min(len(context), length)
        labels[row, first_target:length] = padded.input_ids[row, first_target:length]
        if first_target == length:
            num_without_targets += 1
    return EncodedSet(padded.input_ids, padded.attention_mask, labels, num_truncated, num_without_targets)


@dataclass(frozen=True)
class SequenceLengths:
    """Token counts of a set of examples as training would tokenize them, before any window cuts them."""

    context: tuple[int, ...]  # prompt + separator: never trained on
    total: tuple[int, ...]  # context + completion + EOS

    def __post_init__(self) -> None:
        if len(self.context) != len(self.total) or any(c > t for c, t in zip(self.context, self.total, strict=True)):
            raise DataError("SequenceLengths needs one context length per example, each at most its total")

    def truncated(self, max_seq_len: int) -> int:
        """Examples that a window of `max_seq_len` cuts on the right."""
        return sum(total > max_seq_len for total in self.total)

    def without_targets(self, max_seq_len: int) -> int:
        """Examples with no trained token left in the window: their context fills it."""
        return sum(context >= min(total, max_seq_len) for context, total in zip(self.context, self.total, strict=True))

    def window_fitting(self, share: float = 0.95, multiple: int = 16) -> int:
        """The shortest window, a multiple of `multiple`, that holds at least `share` of the examples whole."""
        if not self.total:
            raise DataError("there are no examples to size a window from")
        if not 0 < share <= 1 or multiple < 1:
            raise DataError(f"share must be in (0, 1] and multiple at least 1, got {share} and {multiple}")
        ordered = sorted(self.total)
        needed = ordered[max(math.ceil(share * len(ordered)) - 1, 0)]
        return max(math.ceil(needed / multiple), 1) * multiple


def sequence_lengths(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    eos_token_id: int | None,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
) -> SequenceLengths:
    """The token counts encode_examples would see, without a window: to choose one, or to say what it cuts."""
    tokenizer = _without_padding_or_truncation(tokenizer)
    parts = [prompt_format.context_and_target(example) for example in examples]
    context_ids = _encode_all(tokenizer, [context for context, _ in parts])
    target_ids = _encode_all(tokenizer, [target for _, target in parts])
    eos = 0 if eos_token_id is None else 1
    return SequenceLengths(
        context=tuple(len(c) for c in context_ids),
        total=tuple(len(c) + len(t) + eos for c, t in zip(context_ids, target_ids, strict=True)),
    )


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _without_padding_or_truncation(tokenizer: Tokenizer) -> Tokenizer:
    # A tokenizer.json saved by transformers may carry padding or truncation settings; either would pad or
    # cut the prompt and completion separately and break the boundary. Work on a copy: the caller's
    # tokenizer is not ours to reconfigure.
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


@dataclass(frozen=True)
class PaddedRows:
    """Token rows at the fixed (B, T) shape the ONNX head was traced for."""

    input_ids: NDArray[np.int64]  # (B, T), pad_token_id after each row's tokens
    attention_mask: NDArray[np.int64]  # (B, T), 1 on each row's tokens, 0 on padding
    lengths: NDArray[np.int64]  # (B,), tokens in each row (1 for a filler row)


def pad_rows(
    rows: Sequence[Sequence[int]], max_seq_len: int, pad_token_id: int, batch_size: int | None = None
) -> PaddedRows:
    """Pad token `rows` on the right to (batch_size, max_seq_len), batch_size defaulting to len(rows).

    Rows past len(rows) are filler: one attended pad token each, because a row with no attended position
    at all makes attention's softmax divide by zero and the NaN would reach the real rows' batch statistics.
    Every row must hold 1 to max_seq_len tokens: cutting is the caller's choice (the end for training, the
    start for generation), never done silently here.
    """
    count = len(rows)
    batch_size = count if batch_size is None else batch_size
    if max_seq_len < 1 or count > batch_size:
        raise DataError(f"cannot pad {count} rows to a batch of {batch_size} x {max_seq_len}")
    if pad_token_id < 0:
        raise DataError(f"pad_token_id must be >= 0, got {pad_token_id}")
    shape = (batch_size, max_seq_len)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    lengths = np.ones(batch_size, dtype=np.int64)
    attention_mask[count:, 0] = 1
    for index, row in enumerate(rows):
        if not 1 <= len(row) <= max_seq_len:
            raise DataError(f"row {index} holds {len(row)} tokens; a row takes 1 to {max_seq_len}")
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
        lengths[index] = len(row)
    return PaddedRows(input_ids, attention_mask, lengths)


@dataclass(frozen=True)
class Batch:
    """One batch of the fixed size the ONNX head was traced for."""

    input_ids: NDArray[np.int64]  # (B, T)
    attention_mask: NDArray[np.int64]  # (B, T)
    labels: NDArray[np.int64]  # (B, T)
    indices: NDArray[np.int64]  # (B,), rows of the EncodedSet, for logging and reproducibility checks


def iterate_batches(
    encoded: EncodedSet, batch_size: int, seed: int, epoch_shuffle: bool = True, group_by_length: bool = False
) -> Iterator[Batch]:
    """Yield full batches forever, the same sequence for the same seed.

    Each epoch visits every example once, in a fresh order from numpy's Generator(seed) when
    `epoch_shuffle`. A batch that would run past the end of an epoch is filled from the start of the next
    one: the ONNX head only accepts `batch_size` rows, and padding rows would waste a round trip.

    `group_by_length` (with `epoch_shuffle`): each run of LENGTH_GROUP_BATCHES batches' worth of the shuffled
    examples is sorted by length (in bands of LENGTH_GROUP_BAND tokens) and cut into batches, and the epoch's
    batches are then shuffled. A batch's examples are then of like length, so a head that cuts each batch to
    its longest example (--dynamic-seq or --seq-buckets) computes little padding; which examples share a step
    is still random, and every example is still seen once an epoch.
    """
    # Validated here rather than inside the generator, so a bad argument fails at the call, not at next().
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if len(encoded) == 0:
        raise DataError("cannot make batches from an empty training set")
    if group_by_length and not epoch_shuffle:
        raise DataError("grouping by length reorders the examples: it needs epoch_shuffle")
    rng = np.random.default_rng(seed)
    lengths = encoded.attention_mask.sum(axis=1) if group_by_length else None
    return _batches(encoded, batch_size, rng, epoch_shuffle, lengths)


def length_grouped_order(lengths: NDArray[np.int64], batch_size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """One epoch's example order, grouped by length: batch_size-long runs of like-length examples, in random
    order. The last `len(lengths) % batch_size` examples (the shortest of the last group) come last, so that
    the next epoch completes their batch."""
    order = rng.permutation(len(lengths)).astype(np.int64)
    group = LENGTH_GROUP_BATCHES * batch_size
    # Within each group, longest band first; a stable sort keeps the shuffled order within a band.
    bands = lengths // LENGTH_GROUP_BAND
    chunks = np.split(order, range(group, len(order), group))
    grouped = np.concatenate([chunk[np.argsort(-bands[chunk], kind="stable")] for chunk in chunks])
    full = len(grouped) - len(grouped) % batch_size
    batches = grouped[:full].reshape(-1, batch_size)[rng.permutation(full // batch_size)]
    return np.concatenate([batches.reshape(-1), grouped[full:]])


def _batches(
    encoded: EncodedSet,
    batch_size: int,
    rng: np.random.Generator,
    epoch_shuffle: bool,
    lengths: NDArray[np.int64] | None = None,
) -> Iterator[Batch]:
    pending = np.empty(0, dtype=np.int64)
    while True:
        if lengths is not None:
            epoch_order = length_grouped_order(lengths, batch_size, rng)
        else:
            epoch_order = rng.permutation(len(encoded)) if epoch_shuffle else np.arange(len(encoded))
        pending = np.concatenate([pending, epoch_order.astype(np.int64)])
        # With fewer examples than batch_size, an epoch cannot fill a batch; the loop simply takes another.
        while len(pending) >= batch_size:
            indices, pending = pending[:batch_size], pending[batch_size:]
            yield Batch(
                input_ids=encoded.input_ids[indices],
                attention_mask=encoded.attention_mask[indices],
                labels=encoded.labels[indices],
                indices=indices,
            )


def fit_to_bucket(batch: Batch, buckets: Sequence[int]) -> Batch:
    """`batch` cut on the right to the shortest of `buckets` that holds its longest row.

    What is cut is padding only (every row is padded on the right): no attended position and no label is
    lost, and a causal model's outputs at the kept positions do not depend on the cut ones, so the step's
    loss and gradients are those of the full-length batch, at the cost of the shorter one.
    """
    width = batch.attention_mask.shape[1]
    attended = np.flatnonzero(batch.attention_mask.any(axis=0))
    longest = int(attended[-1]) + 1 if attended.size else 1
    seq_len = min((b for b in buckets if longest <= b <= width), default=width)
    if seq_len == width:
        return batch
    return Batch(
        input_ids=np.ascontiguousarray(batch.input_ids[:, :seq_len]),
        attention_mask=np.ascontiguousarray(batch.attention_mask[:, :seq_len]),
        labels=np.ascontiguousarray(batch.labels[:, :seq_len]),
        indices=batch.indices,
    )


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle example indices and deal them into `num_clients` parts whose sizes differ by at most one."""
    _check_partition_size(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels_or_groups: Sequence[int], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Non-IID split of example indices: each group is shared out by Dirichlet(alpha) proportions.

    The usual label-skew benchmark (Hsu et al., 2019): small alpha gives each client few groups, large
    alpha approaches an IID split. Every client gets at least one example: empty clients take one from the
    largest client, which keeps the skew yet never leaves a client with nothing to train on.
    Raises DataError if there are fewer examples than clients. Deterministic given the seed.
    """
    _check_partition_size(len(labels_or_groups), num_clients)
    if not (math.isfinite(alpha) and alpha > 0.0):
        raise DataError(f"the Dirichlet concentration alpha must be a finite number > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    groups = np.asarray(labels_or_groups)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for group in np.unique(groups):  # sorted, so the draws happen in the same order on every run
        members = rng.permutation(np.flatnonzero(groups == group))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        if not np.isfinite(proportions).all():
            # numpy < 1.25 returns NaN when every gamma draw underflows (tiny alpha); the limit of
            # Dirichlet(alpha) as alpha -> 0 puts the whole group on one client.
            proportions = np.eye(num_clients)[rng.integers(num_clients)]
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, share in enumerate(np.split(members, cuts)):
            clients[client].extend(share.tolist())

    for indices in clients:
        if not indices:
            donor = max(clients, key=len)  # holds two or more: there are at least as many examples as clients
            indices.append(donor.pop(int(rng.integers(len(donor)))))
    return [sorted(indices) for indices in clients]


def _check_partition_size(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_examples < num_clients:
        raise DataError(
            f"cannot give each of {num_clients} clients at least one example: there are only {num_examples}"
        )
