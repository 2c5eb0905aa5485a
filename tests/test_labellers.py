"""Labellers: thresholds, pair selection, the judge's position swap and malformed verdicts, and an
OpenAI-compatible judge served by a stub on loopback."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from prospect.errors import UserError
from prospect.evaluation.ai_judges import HTTPJudge, parse_rating, parse_verdict
from prospect.online.labellers import (
    Group,
    JudgeLabeller,
    balance_labels,
    binary_labels,
    filtered,
    select_pairs,
)

GROUPS = [Group("p1", ["a", "b", "c", "d"], [0.1, 0.9, 0.4, 0.6]), Group("p2", ["e", "f"], [2.0, 2.0])]


def labels(rows):
    return {(r["prompt"], r["completion"]): r["label"] for r in rows}


def test_binary_thresholds():
    assert labels(binary_labels(GROUPS, "fixed", 0.5)) == {
        ("p1", "a"): False,
        ("p1", "b"): True,
        ("p1", "c"): False,
        ("p1", "d"): True,
        ("p2", "e"): True,
        ("p2", "f"): True,
    }
    # mean of p1 is 0.5; p2's samples tie with their mean and are left out
    assert labels(binary_labels(GROUPS, "mean")) == {
        ("p1", "a"): False,
        ("p1", "b"): True,
        ("p1", "c"): False,
        ("p1", "d"): True,
    }
    assert labels(binary_labels([Group("p", ["x", "y", "z"], [1.0, 5.0, 2.0])], "median")) == {
        ("p", "x"): False,
        ("p", "y"): True,
    }


def test_balance_keeps_all_desirable_and_contrasting_undesirable_first():
    groups = [
        Group("p1", ["right", "w1", "w2"], [1.0, 0.0, 0.0]),
        Group("p2", ["w3", "w4", "w5", "w6"], [0.0, 0.0, 0.0, 0.0]),
        Group("p3", ["right2", "w7"], [1.0, 0.0]),
    ]
    rows = binary_labels(groups, "fixed", 0.5)
    assert len(balance_labels(rows, 0.0, random.Random(0))) == len(rows) == 9
    for seed in range(5):
        kept = balance_labels(rows, 1.5, random.Random(seed))  # 2 desirable -> 3 undesirable
        assert [r["completion"] for r in kept if r["label"]] == ["right", "right2"]
        wrong = {r["completion"] for r in kept if not r["label"]}
        assert len(wrong) == 3 and {"w1", "w2", "w7"} == wrong  # same-prompt failures come first
    kept = balance_labels(rows, 2.0, random.Random(0))
    wrong = [r["completion"] for r in kept if not r["label"]]
    assert len(wrong) == 4 and {"w1", "w2", "w7"} < set(wrong)
    assert wrong == sorted(wrong, key=[r["completion"] for r in rows].index)  # original order kept


def test_pair_selection():
    best_worst = select_pairs(GROUPS, "best_worst")
    assert [(r["chosen"], r["rejected"]) for r in best_worst] == [("b", "a")]  # p2 has no preference
    randoms = select_pairs(GROUPS, "random", rng=random.Random(1))
    assert len(randoms) == 1 and randoms[0]["margin"] > 0
    wide = select_pairs(GROUPS, "min_gap", min_gap=0.45, rng=random.Random(1))
    assert all(r["margin"] >= 0.45 for r in wide) and wide
    assert select_pairs(GROUPS, "min_gap", min_gap=0.9) == []


def test_filtered():
    assert [r["completion"] for r in filtered(GROUPS, 0.6)] == ["b", "d", "e", "f"]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Verdict: A", "A"),
        ("blah blah\n**Verdict:** (B)", "B"),
        ("B", "B"),
        ("I think A is better. Verdict - B", "B"),
        ("both are fine", None),
        ("", None),
        ("Verdict: C", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_parse_rating():
    assert parse_rating("Good. Rating: 7") == 7.0
    assert parse_rating("Rating: 11") is None and parse_rating("seven") is None


def test_judge_asks_both_orders_and_averages():
    asked = []

    def always_first(conversations):  # a judge with pure position bias
        asked.extend(conversations)
        return ["Verdict: A"] * len(conversations)

    judge = JudgeLabeller(always_first)
    assert judge.compare(["q"], [("good answer", "bad answer")]) == [0.5]
    assert (
        "Response A:\ngood answer" in asked[0][0]["content"]
        and "Response A:\nbad answer" in asked[1][0]["content"]
    )

    def knows_best(conversations):
        return [
            "Verdict: A" if c[0]["content"].index("good") < c[0]["content"].index("bad") else "Verdict: B"
            for c in conversations
        ]

    assert JudgeLabeller(knows_best).compare(["q", "q"], [("good", "bad"), ("bad", "good")]) == [1.0, 0.0]


def test_malformed_verdicts_are_counted_not_fatal():
    replies = iter(["Verdict: A", "no idea", "Verdict: B", "Verdict: A", "I refuse", "???"])
    judge = JudgeLabeller(lambda conversations: [next(replies) for _ in conversations], cot=True)
    groups = [Group(f"p{i}", ["x", "y"]) for i in range(3)]
    rows = judge.judged_pairs(groups, random.Random(0))
    assert judge.report() == {"judge_calls": 6, "judge_malformed": 3}
    assert len(rows) == 1  # pair 2 agreed in both orders; pair 1 and 3 had a malformed reply
    assert "Think step by step" in judge.instructions("compare")


class StubJudge(BaseHTTPRequestHandler):
    seen: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer sk-test-secret":
            self.send_response(401)
            self.end_headers()
            return
        text = body["messages"][0]["content"]
        a = text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = text.split("Response B:\n")[1].split("\n\nWhich response")[0]
        verdict = "Verdict: A" if a.count("e") > b.count("e") else "Verdict: B"  # likes the letter e
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"choices": [{"message": {"content": verdict}}]}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_http_judge_against_a_stub(stub_server, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    judge = HTTPJudge(stub_server, model="stub-judge", key_env="JUDGE_KEY")
    labeller = JudgeLabeller(judge)
    assert labeller.compare(["cheese?"], [("cheese", "milk")]) == [1.0]
    assert labeller.compare(["cheese?"], [("milk", "cheese")]) == [0.0]
    path, auth, body = StubJudge.seen[-1]
    assert (
        path == "/v1/chat/completions" and body["model"] == "stub-judge" and auth == "Bearer sk-test-secret"
    )
    assert "sk-test-secret" not in repr(judge)
    monkeypatch.setenv("JUDGE_KEY", "sk-wrong")
    with pytest.raises(UserError) as error:
        labeller.compare(["weather?"], [("sunny", "rainy")])
    assert "HTTP 401" in str(error.value) and "sk-wrong" not in str(error.value)
    assert "sk-" not in caplog.text
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(UserError, match="JUDGE_KEY is not set"):
        labeller.compare(["weather?"], [("sunny", "rainy")])


class Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted reply: (status, headers, body)."""

    script: ClassVar[list] = []
    seen: ClassVar[list] = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        Scripted.seen.append((self.server.server_address[1], self.headers.get("Authorization")))
        status, headers, body = Scripted.script.pop(0) if Scripted.script else (200, {}, VERDICT_A)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


VERDICT_A = json.dumps({"choices": [{"message": {"content": "Verdict: A"}}]}).encode()


@pytest.fixture
def scripted():
    servers = [HTTPServer(("127.0.0.1", 0), Scripted) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.script.clear()
    Scripted.seen.clear()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for server in servers:
        server.shutdown()


def test_http_judge_retries_then_labels_the_item_failed(scripted, monkeypatch):
    """A busy server is asked again; one that keeps failing, or replies with bytes that are not a reply,
    costs the item, not the run."""
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    judge = HTTPJudge(scripted[0] + "/v1", "m", "JUDGE_KEY", retries=2, backoff=0.01)
    Scripted.script[:] = [(503, {}, b""), (429, {"Retry-After": "0"}, b"")]
    assert judge([[{"role": "user", "content": "x"}]]) == ["Verdict: A"]  # third try answers
    Scripted.script[:] = [(500, {}, b"")] * 3
    assert judge([[{"role": "user", "content": "x"}]]) == [""] and judge.failed == 1
    Scripted.script[:] = [
        (200, {}, b"\xff\xfe not utf-8"),
        (200, {}, b'{"choices": [{"message": {"content": 7}}]}'),
    ]
    assert judge([[{"role": "user", "content": "x"}]] * 2) == ["", ""]
    unreachable = HTTPJudge("http://127.0.0.1:9/v1", "m", "JUDGE_KEY", timeout=1, retries=1, backoff=0.01)
    assert unreachable([[{"role": "user", "content": "x"}]]) == [""] and unreachable.failed == 1


def test_http_judge_never_sends_the_key_to_another_origin(scripted, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    first, second = scripted
    Scripted.script[:] = [(307, {"Location": second + "/v1/chat/completions"}, b"")]
    judge = HTTPJudge(first + "/v1", "m", "JUDGE_KEY", retries=0)
    with pytest.raises(UserError, match=r"redirected to .*another origin; not followed") as error:
        judge([[{"role": "user", "content": "x"}]])
    assert "sk-test-secret" not in str(error.value)
    assert [port for port, _ in Scripted.seen] == [
        int(first.rsplit(":", 1)[1])
    ]  # the other server saw nothing


def test_http_judge_refuses_plain_http_to_another_machine():
    with pytest.raises(UserError, match="plain http would send the API key unencrypted"):
        HTTPJudge("http://judge.example.org/v1", "m")
    HTTPJudge("http://judge.example.org/v1", "m", allow_http=True)  # the user's explicit choice
    HTTPJudge("http://localhost:8000/v1", "m")  # this machine
    with pytest.raises(UserError, match="expected an http"):
        HTTPJudge("ftp://judge.example.org/v1", "m")
