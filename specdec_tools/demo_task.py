"""The demo task: spell a number in English words, e.g. ``spell 4512`` -> ``four thousand five
hundred twelve``.

Everything is generated offline and deterministically: the converter below is the ground
truth, the train/held-out split is a fixed hash of the number, and the sampled prompts come
from seeded numpy generators. The tokenizer is a small sentencepiece unigram model trained on
task text, with every digit its own token.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAX_NUMBER = 999_999
MAX_DIGITS = 6
PROMPT_PREFIX = "spell "
TOKENIZER_VOCAB = 65  # the most unigram pieces the task text supports: ~30 whole words, letters, digits
HELD_OUT_MODULUS = 10  # one number in ten (from 100 up) is never shown in training
ALWAYS_TRAIN_BELOW = 100  # 0..99 carry the base words; all of them are training numbers

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """0..999,999 in lower-case English words, no "and", no hyphens: 4512 -> "four thousand
    five hundred twelve"."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"the demo task spells 0..{MAX_NUMBER:,}, not {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (" " + _ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _ONES[n // 100] + " hundred" + (" " + number_to_words(n % 100) if n % 100 else "")
    return number_to_words(n // 1000) + " thousand" + (
        " " + number_to_words(n % 1000) if n % 1000 else ""
    )


def prompt_for(n: int) -> str:
    return f"{PROMPT_PREFIX}{n}"


def number_in(prompt: str) -> int:
    """The number a prompt asks for (the inverse of ``prompt_for``)."""
    return int(prompt.removeprefix(PROMPT_PREFIX).strip())


def is_correct(prompt: str, answer: str) -> bool:
    """The checker: does ``answer`` spell the prompt's number exactly (spacing aside)?"""
    return " ".join(answer.split()) == number_to_words(number_in(prompt))


def is_held_out(n: np.ndarray | int) -> np.ndarray | bool:
    """The fixed split: a Knuth multiplicative hash of n, one in ``HELD_OUT_MODULUS`` from 100 up."""
    values = np.asarray(n, dtype=np.uint64)
    hashed = (values * np.uint64(2654435761)) % np.uint64(2**32)
    held = (hashed % np.uint64(HELD_OUT_MODULUS) == 0) & (values >= ALWAYS_TRAIN_BELOW)
    return bool(held) if np.ndim(n) == 0 else held


def sample_numbers(
    rng: np.random.Generator, count: int, held_out: bool, min_digits: int = 1
) -> np.ndarray:
    """``count`` numbers from one side of the split, the digit count uniform in min_digits..6
    (so "7" and "31" are as common as "482913")."""
    out = np.empty(0, dtype=np.int64)
    while len(out) < count:
        digits = rng.integers(min_digits, MAX_DIGITS + 1, size=2 * count)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))
        numbers = rng.integers(low, 10**digits)
        numbers = numbers[is_held_out(numbers) == held_out]
        out = np.concatenate([out, numbers])
    return out[:count]


def eval_numbers(count: int = 200, seed: int = 1234) -> list[int]:
    """Held-out numbers (3 to 6 digits: every smaller one is a training number) for evaluation."""
    rng = np.random.default_rng(seed)
    return [int(n) for n in sample_numbers(rng, count, held_out=True, min_digits=3)]


def corpus_lines(count: int = 20_000, seed: int = 0) -> list[str]:
    """Prompts and answers of training numbers: the text the tokenizer is trained on."""
    rng = np.random.default_rng(seed)
    numbers = sample_numbers(rng, count, held_out=False)
    return [line for n in numbers for line in (prompt_for(int(n)), number_to_words(int(n)))]


def train_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A T5-style sentencepiece unigram model (pad 0, eos 1, unk 2, every digit its own piece),
    saved as a tokenizer directory that ``load_tokenizer`` reads."""
    from .tiny_checkpoints import write_sentencepiece_tokenizer

    return write_sentencepiece_tokenizer(corpus_lines(), out_dir, vocab_size, model_max_length=64,
                                         split_digits=True)
