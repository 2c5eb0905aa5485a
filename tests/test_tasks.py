"""Built-in verifiable tasks: correct answers, disjoint splits, exact-match scoring."""

from __future__ import annotations

import ast
import operator

import pytest

from prospect.data import tasks
from prospect.data.sources import read_rows

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def reference_value(expression: str) -> int:
    """Python's own parse of the expression, as an independent check of the task's parser."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        return node.value

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arithmetic_answers_are_right(level):
    for question, answer, _ in tasks.problems("arithmetic", (level,))[:300]:
        assert answer == reference_value(question)


@pytest.mark.parametrize("name", ["arithmetic", "word-problems", "arithmetic-2"])
def test_splits_never_share_a_problem(name):
    train, test = read_rows(name, "train"), read_rows(name, "test")
    questions = lambda rows: {r.values["prompt"][0]["content"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(test)
    assert 0.06 < len(test) / (len(train) + len(test)) < 0.14
    assert read_rows(name, "train")[0].values == train[0].values  # generated the same way every time


def test_word_problem_levels():
    rows = read_rows("word-problems", "train")
    assert {r.values["level"] for r in rows} == {1, 2, 3}
    assert all(int(r.values["answer"]) >= 0 for r in rows if r.values["level"] != 2)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("19 + 74 = 93. Answer: 93", 1.0),
        ("Answer: 93.", 1.0),
        ("answer = 93", 1.0),
        ("The sum is 93", 1.0),
        ("Answer: 92", 0.0),
        ("I don't know", 0.0),
        ("Answer: 9 ... no wait, Answer: 93", 1.0),
        ("Answer: 1,093", 0.0),
    ],
)
def test_exact_match(completion, expected):
    assert tasks.exact_match("19 + 74 =", completion, {"answer": "93"}) == expected
