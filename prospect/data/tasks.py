"""Built-in verifiable tasks, generated offline from a seed, with exact-match scoring.

- `arithmetic`: expressions of increasing depth (level 1: a + b; level 2: a op b op c; level 3: with
  parentheses and a product), integer answers.
- `word-problems`: GSM-style two- and three-step stories (shopping, sharing, rates) with integer answers.

Each problem's split is a hash of its text, so train and test never share a problem, whatever the seed.
Rows are {prompt, answer, level}; the prompt asks for the final answer after "Answer:".
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Callable

from prospect.data.row import Row
from prospect.errors import UserError

INSTRUCTION = "Solve the problem. End with 'Answer: <number>'."
PER_LEVEL = 2000
HELD_OUT_PERCENT = 10


def arithmetic_problem(rng: random.Random, level: int) -> tuple[str, int]:
    if level == 1:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-")
        return f"{a} {op} {b}", a + b if op == "+" else a - b
    if level == 2:
        a, b, c = (rng.randint(2, 50) for _ in range(3))
        ops = [rng.choice("+-"), rng.choice("+-*")]
        text = f"{a} {ops[0]} {b} {ops[1]} {c}"
        return text, eval_expression(text)
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    text = f"({a} {rng.choice('+-')} {b}) * {c} {rng.choice('+-')} {d}"
    return text, eval_expression(text)


def eval_expression(text: str) -> int:
    """Integer arithmetic with + - * and parentheses, by a tiny recursive-descent parser (no eval)."""
    tokens = re.findall(r"\d+|[-+*()]", text)
    position = 0

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def atom() -> int:
        token = take()
        if token == "(":
            value = expression()
            take()  # ")"
            return value
        return int(token)

    def term() -> int:
        value = atom()
        while position < len(tokens) and tokens[position] == "*":
            take()
            value *= atom()
        return value

    def expression() -> int:
        value = term()
        while position < len(tokens) and tokens[position] in "+-":
            value = value + term() if take() == "+" else value - term()
        return value

    return expression()


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells"]


def word_problem(rng: random.Random, level: int) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if level == 1:
        a, b = rng.randint(5, 60), rng.randint(2, 30)
        return (
            f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?",
            a + b,
        )
    if level == 2:
        packs, each, used = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 10)
        return (
            f"{name} buys {packs} packs of {item} with {each} in each pack, then gives away {used}. "
            f"How many {item} does {name} have left?",
            packs * each - used,
        )
    price, count, friends = rng.randint(2, 9), rng.randint(2, 8), rng.randint(1, 4)
    return (
        f"{name} and {friends} friends each buy {count} {item} at {price} dollars each. "
        f"How many dollars do they spend in total?",
        price * count * (friends + 1),
    )


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, int]]] = {
    "arithmetic": arithmetic_problem,
    "word-problems": word_problem,
}


@functools.lru_cache(maxsize=16)
def problems(task: str, levels: tuple[int, ...], seed: int = 0) -> list[tuple[str, int, int]]:
    """(question, answer, level), distinct questions, PER_LEVEL per level (fewer when a level runs out)."""
    out, seen = [], set()
    for level in levels:
        rng = random.Random(seed * 1000 + level)
        made = 0
        for _ in range(PER_LEVEL * 5):
            question, answer = GENERATORS[task](rng, level)
            if question not in seen:
                seen.add(question)
                out.append((question, answer, level))
                made += 1
            if made == PER_LEVEL:
                break
    return out


def held_out(question: str) -> bool:
    return zlib.crc32(question.encode()) % 100 < HELD_OUT_PERCENT


def rows(task: str, levels: list[int], split: str) -> list[Row]:
    if split not in ("train", "test"):
        raise UserError(f"{task}: no split '{split}'; it has train, test")
    out = []
    for question, answer, level in problems(task, tuple(levels)):
        if held_out(question) == (split == "test"):
            prompt = [
                {
                    "role": "user",
                    "content": f"{INSTRUCTION}\n{question}" + ("" if task != "arithmetic" else " ="),
                }
            ]
            out.append(
                Row(f"{task}[{split}]: {question}", {"prompt": prompt, "answer": str(answer), "level": level})
            )
    return out


def loader(task: str, levels: list[int]) -> Callable[[str], list[Row]]:
    return lambda split: rows(task, levels, split)


# `arithmetic` (all levels) and `arithmetic-1` .. `arithmetic-3`, likewise for every task.
BUILTINS = {
    name: loader(task, levels)
    for task in GENERATORS
    for name, levels in [(task, [1, 2, 3])] + [(f"{task}-{level}", [level]) for level in (1, 2, 3)]
}


ANSWER = re.compile(r"answer\s*[:=]?\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*")


def extract_answer(completion: str) -> str | None:
    """The number after the last 'Answer:', else the last number in the text."""
    found = ANSWER.findall(completion) or NUMBER.findall(completion)
    return found[-1].replace(",", "") if found else None


def exact_match(prompt, completion: str, row: dict) -> float:
    """1.0 when the completion's final answer equals the row's answer, else 0.0 (a verifier reward)."""
    return float(extract_answer(completion) == str(row["answer"]).strip())
