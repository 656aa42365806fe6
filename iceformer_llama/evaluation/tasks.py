"""Synthetic long-context retrieval tasks: passkey retrieval and LongEval-style line retrieval.

Each generator is deterministic for its `seed` and sizes its prompt to about `n_tokens` tokens of the
model's tokenizer (`count_tokens`: text -> number of tokens). The prompt ends where the answer
starts, so a plain completion (greedy, a few tokens) is scored by exact match of the number:

    task = passkey_task(2048, depth=0.5, seed=1, count_tokens=lambda s: len(llm.tokenize(s.encode())))
    text = complete(task.prompt)          # e.g. " 48213. Remember it."
    task.is_correct(text)                 # the first number in the answer equals task.answer

The needle (the passkey sentence, or the asked-for line) sits at fraction `depth` of the filler:
0.0 at the start of the context, 1.0 just before the question. `task.needle_offset` is its character
offset in the prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

TASKS = ("passkey", "lines")

_PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.\n\n")
_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

_LINES_INTRO = "Below is a record of lines I want you to remember. Each line begins with 'line <name>'.\n\n"

# Word pairs name the lines, as in LongEval ("line righteous-ethernet: REGISTER_CONTENT is <12345>").
_WORDS = ("amber", "apple", "arrow", "autumn", "basket", "beacon", "birch", "bridge", "canyon", "carbon",
          "cedar", "cobalt", "comet", "copper", "coral", "crystal", "delta", "desert", "ember", "falcon",
          "feather", "forest", "galaxy", "garnet", "glacier", "harbor", "hazel", "island", "ivory", "jasmine",
          "lantern", "lemon", "marble", "meadow", "mirror", "nebula", "oasis", "orbit", "pebble", "pepper",
          "planet", "quartz", "raven", "ribbon", "river", "saddle", "silver", "spruce", "summit", "thunder",
          "timber", "tulip", "velvet", "violet", "walnut", "willow", "winter", "zephyr")

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Task:
    kind: str             # "passkey" or "lines"
    prompt: str           # ends where the answer begins
    answer: str           # the number to retrieve, as digits
    depth: float          # where the needle sits, 0.0 (start) .. 1.0 (end)
    needle_offset: int    # character offset of the needle in `prompt`
    n_tokens: int         # prompt length in tokens, as `count_tokens` counted it
    seed: int

    def is_correct(self, completion: str) -> bool:
        """Exact match: the first number in the completion is the answer."""
        found = _NUMBER.search(completion)
        return found is not None and found.group(0) == self.answer

    def as_dict(self) -> dict:
        return {"kind": self.kind, "answer": self.answer, "depth": self.depth, "n_tokens": self.n_tokens,
                "seed": self.seed}


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters a token), for tests and dry runs."""
    return max(1, len(text) // 4)


def _check(n_tokens: int, depth: float) -> None:
    if n_tokens < 64:
        raise ValueError(f"a task needs at least 64 tokens, got {n_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def passkey_task(n_tokens: int, *, depth: float, seed: int, count_tokens: Callable[[str], int] = approx_tokens) -> Task:
    """A 5-digit pass key hidden at `depth` in repeated filler sentences, about n_tokens long."""
    _check(n_tokens, depth)
    rng = random.Random(f"passkey:{seed}")
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(n_filler: int) -> tuple[str, int]:
        before = round(depth * n_filler)
        head = _PASSKEY_INTRO + _PASSKEY_FILLER * before
        return head + needle + _PASSKEY_FILLER * (n_filler - before) + _PASSKEY_QUESTION, len(head)

    n_filler = _fit(lambda n: count_tokens(build(n)[0]), n_tokens, per_unit=count_tokens(_PASSKEY_FILLER * 8) / 8)
    prompt, offset = build(n_filler)
    return Task("passkey", prompt, key, depth, offset, count_tokens(prompt), seed)


def lines_task(n_tokens: int, *, depth: float, seed: int, count_tokens: Callable[[str], int] = approx_tokens) -> Task:
    """LongEval-style line retrieval: many 'line <name>: REGISTER_CONTENT is <n>' lines, asks for the one
    at `depth`; about n_tokens long. Names and numbers are distinct."""
    _check(n_tokens, depth)
    rng = random.Random(f"lines:{seed}")
    pairs = [f"{a}-{b}" for a in _WORDS for b in _WORDS if a != b]
    rng.shuffle(pairs)
    numbers = rng.sample(range(10000, 100000), 4000)

    def line(i: int) -> str:
        return f"line {pairs[i]}: REGISTER_CONTENT is <{numbers[i]}>\n"

    def build(n_lines: int) -> tuple[str, int, int]:
        target = min(n_lines - 1, round(depth * (n_lines - 1)))
        head = _LINES_INTRO + "".join(line(i) for i in range(target))
        body = head + "".join(line(i) for i in range(target, n_lines))
        question = (f"\nTell me what is the REGISTER_CONTENT in line {pairs[target]}? I need the number.\n"
                    f"line {pairs[target]}: REGISTER_CONTENT is <")
        return body + question, target, len(head)

    per_line = count_tokens("".join(line(i) for i in range(16))) / 16
    n_lines = _fit(lambda n: count_tokens(build(n)[0]), n_tokens, per_unit=per_line, limit=len(numbers))
    prompt, target, offset = build(n_lines)
    return Task("lines", prompt, str(numbers[target]), depth, offset, count_tokens(prompt), seed)


def make_task(kind: str, n_tokens: int, *, depth: float, seed: int,
              count_tokens: Callable[[str], int] = approx_tokens) -> Task:
    if kind == "passkey":
        return passkey_task(n_tokens, depth=depth, seed=seed, count_tokens=count_tokens)
    if kind == "lines":
        return lines_task(n_tokens, depth=depth, seed=seed, count_tokens=count_tokens)
    raise ValueError(f"unknown task {kind!r}: choose from {', '.join(TASKS)}")


def _fit(length_of: Callable[[int], int], n_tokens: int, *, per_unit: float, limit: int = 1 << 20) -> int:
    """The largest number of filler units (>= 1) whose prompt fits in n_tokens, found from an estimate
    and corrected with a few exact counts."""
    per_unit = max(per_unit, 1e-3)
    overhead = length_of(1) - per_unit
    n = max(1, min(limit, int((n_tokens - overhead) / per_unit)))
    for _ in range(64):
        size = length_of(n)
        if size > n_tokens and n > 1:
            n = max(1, n - max(1, int((size - n_tokens) / per_unit)))
        elif size <= n_tokens and n < limit and length_of(n + 1) <= n_tokens:
            n += max(1, int((n_tokens - size) / per_unit) - 1)
            n = min(n, limit)
        else:
            break
    while n > 1 and length_of(n) > n_tokens:
        n -= 1
    if length_of(n) > n_tokens:
        raise ValueError(f"{n_tokens} tokens are too few for this task (it needs {length_of(n)})")
    return n
