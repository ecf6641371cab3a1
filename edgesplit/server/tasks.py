"""Tasks the demo generates itself: nothing is downloaded, nothing is copied from a data set.

The default task, `shape-codes`, turns a described object into a short code, one letter per attribute:

    prompt "Convert to code: red circle big"   ->   completion "R-C-B"

A model that was never trained on it answers with prose (its held-out exact match is 0), while LoRA on
SmolLM2-135M learns the rule from a few hundred examples. The held-out examples are attribute
*combinations* never seen in training, so a high score means the rule was learned, not the pairs
memorised. Every example carries a group label (its shape) for the non-IID Dirichlet split: a client
may see mostly circles and stars, another mostly cubes, and federated averaging has to merge them.

`shape-codes-w` is the same task spelled in the tokens w0..w95 of the tests' tiny word-level tokenizer
(tests/tiny_models.py), so that the demo's whole path runs on a tiny model in CI.

Everything is deterministic given the seed. Only the standard library: no numpy, no torch.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    completion: str
    group: int  # the index of the example's value of the task's group attribute

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "completion": self.completion, "group": self.group}


@dataclass(frozen=True)
class Attribute:
    """One property of the described object: its possible words, and the code each word maps to."""

    name: str
    words: tuple[str, ...]
    codes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.words) != len(self.codes) or not self.words:
            raise ValueError(f"attribute {self.name}: {len(self.words)} words but {len(self.codes)} codes")


def _initials(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(word[0].upper() for word in words)


@dataclass(frozen=True)
class CodeTask:
    """`instruction word word word` -> `code<sep>code<sep>code`, one code per attribute, in order."""

    name: str
    description: str
    instruction: str
    attributes: tuple[Attribute, ...]
    code_separator: str
    group_attribute: int  # which attribute's value is an example's group label

    def __post_init__(self) -> None:
        if not 0 <= self.group_attribute < len(self.attributes):
            raise ValueError(f"group_attribute {self.group_attribute} is not one of {len(self.attributes)}")

    @property
    def num_combinations(self) -> int:
        count = 1
        for attribute in self.attributes:
            count *= len(attribute.words)
        return count

    @property
    def group_names(self) -> tuple[str, ...]:
        return self.attributes[self.group_attribute].words

    def example(self, choice: Sequence[int]) -> TaskExample:
        """The example for one combination: `choice[i]` indexes the words of attribute i."""
        words = [attribute.words[index] for attribute, index in zip(self.attributes, choice, strict=True)]
        codes = [attribute.codes[index] for attribute, index in zip(self.attributes, choice, strict=True)]
        return TaskExample(
            prompt=" ".join([self.instruction, *words]),
            completion=self.code_separator.join(codes),
            group=int(choice[self.group_attribute]),
        )


TASKS: dict[str, CodeTask] = {}


def _register(task: CodeTask) -> CodeTask:
    TASKS[task.name] = task
    return task


_COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "purple", "orange", "gold")
_SHAPES = ("circle", "square", "triangle", "star", "heart", "cube", "ring", "arrow")
_SIZES = ("big", "small", "tiny", "huge")

SHAPE_CODES = _register(
    CodeTask(
        name="shape-codes",
        description="'Convert to code: red circle big' -> 'R-C-B' (initial of colour, shape, size)",
        instruction="Convert to code:",
        attributes=(
            Attribute("colour", _COLORS, _initials(_COLORS)),
            Attribute("shape", _SHAPES, _initials(_SHAPES)),
            Attribute("size", _SIZES, _initials(_SIZES)),
        ),
        # Every word above and every capital letter is one token in SmolLM2's tokenizer, and "-" keeps the
        # letters apart ("RC" would be one token, which the model would have to learn pair by pair).
        code_separator="-",
        group_attribute=1,
    )
)


def _w(first: int, count: int) -> tuple[str, ...]:
    return tuple(f"w{index}" for index in range(first, first + count))


# The same task in the tiny tokenizer's words w0..w95 (whitespace-split, so the codes are space-separated).
SHAPE_CODES_W = _register(
    CodeTask(
        name="shape-codes-w",
        description="the shape-codes task spelled in the test tokenizer's words w0..w95",
        instruction="w0",
        attributes=(
            Attribute("colour", _w(1, 6), _w(40, 6)),
            Attribute("shape", _w(7, 6), _w(50, 6)),
            Attribute("size", _w(13, 4), _w(60, 4)),
        ),
        code_separator=" ",
        group_attribute=1,
    )
)


@dataclass(frozen=True)
class TaskSplit:
    train: list[TaskExample]
    eval: list[TaskExample]  # combinations that never occur in `train`


def generate(task: CodeTask, num_train: int, num_eval: int, seed: int = 0) -> TaskSplit:
    """`num_eval` held-out combinations and `num_train` training examples from the others.

    The combinations are shuffled by `seed`; the first `num_eval` are held out. Training takes the rest in
    that order, cycling through them again (in a fresh order) if `num_train` asks for more.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"need at least one training and one eval example, got {num_train} and {num_eval}")
    if num_eval >= task.num_combinations:
        raise ValueError(
            f"task {task.name} has {task.num_combinations} combinations: holding out {num_eval} leaves none to train on"
        )
    rng = random.Random(seed)
    combinations = list(itertools.product(*(range(len(a.words)) for a in task.attributes)))
    rng.shuffle(combinations)
    held_out, rest = combinations[:num_eval], combinations[num_eval:]
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < num_train:
        chosen.extend(rest[: num_train - len(chosen)])
        rest = rest[:]
        rng.shuffle(rest)
    return TaskSplit(train=[task.example(c) for c in chosen], eval=[task.example(c) for c in held_out])


def write_jsonl(path: Path, examples: Sequence[TaskExample]) -> None:
    """One `{"prompt", "completion", "group"}` object a line: edgesplit's data format (it ignores `group`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_json()) + "\n")
