"""AI judges: a language model asked which of two responses is better, or how good one is, by a local model
or an OpenAI-compatible endpoint. A comparison is asked in both orders and the verdicts are averaged, which
removes the judge's position bias. Output that cannot be parsed never crashes a run: it is counted,
reported, and the item is skipped. The online labellers (online/labellers.py) and `prospect eval` use them.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from prospect.data.formats import Text
from prospect.errors import UserError
from prospect.progress import Progress

if TYPE_CHECKING:  # the HTTP judge needs neither torch nor transformers
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


COMPARE = (
    "You are judging two responses to the same request.\n\nRequest:\n{prompt}\n\nResponse A:\n{a}\n\n"
    "Response B:\n{b}\n\nWhich response is better? {how}"
)
RATE = (
    "Rate how good this response to the request is.\n\nRequest:\n{prompt}\n\nResponse:\n{response}\n\n{how}"
)
VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*\(?\s*([AB])\b", re.IGNORECASE)
LONE_LETTER = re.compile(r"^\s*\(?([AB])\)?[.!]?\s*$", re.MULTILINE)
RATING = re.compile(r"rating\s*[:\-]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge's answer ('Verdict: A', or a line holding just the letter), else None."""
    found = VERDICT.findall(text) or LONE_LETTER.findall(text)
    return found[-1].upper() if found else None


def parse_rating(text: str, low: float = 1, high: float = 10) -> float | None:
    found = RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if low <= value <= high else None


def prompt_text(prompt: Text) -> str:
    return (
        prompt
        if isinstance(prompt, str)
        else "\n".join(m["content"] for m in prompt if m["role"] != "system")
    )


class AIJudge:
    """An AI judge (RLAIF): `complete(list of chat conversations) -> list of replies` is a local model or an
    OpenAI-compatible endpoint. With `cot`, the judge reasons before its verdict."""

    def __init__(self, complete: Callable[[list[list[dict]]], list[str]], cot: bool = False):
        self.complete = complete
        self.cot = cot
        self.asked = 0
        self.malformed = 0

    def instructions(self, kind: str) -> str:
        answer = "'Verdict: A' or 'Verdict: B'" if kind == "compare" else "'Rating: N' with N from 1 to 10"
        if self.cot:
            return f"Think step by step in a few sentences, then end with {answer}."
        return f"Reply with {answer} only."

    def ask(self, conversations: list[list[dict]]) -> list[str]:
        """The judge's replies. An endpoint that gave up on some items labels those failed; one that gave up
        on every item labels nothing, which stops the round (its samples are kept for --resume)."""
        failed = getattr(self.complete, "failed", 0)
        replies = self.complete(conversations)
        self.asked += len(replies)
        if replies and getattr(self.complete, "failed", 0) - failed == len(replies):
            raise UserError(
                f"{self.complete!r}: no reply to any of {len(replies)} requests, even after retries"
            )
        return replies

    def compare(self, prompts: list[Text], pairs: list[tuple[str, str]]) -> list[float | None]:
        """P(first is better) for each pair: 1, 0.5 (the two orders disagree) or 0; None when unparsable."""
        how = self.instructions("compare")
        conversations = []
        for prompt, (x, y) in zip(prompts, pairs):
            for a, b in ((x, y), (y, x)):
                conversations.append(
                    [
                        {
                            "role": "user",
                            "content": COMPARE.format(prompt=prompt_text(prompt), a=a, b=b, how=how),
                        }
                    ]
                )
        replies = self.ask(conversations)
        out = []
        for first, swapped in zip(replies[0::2], replies[1::2]):
            v1, v2 = parse_verdict(first), parse_verdict(swapped)
            self.malformed += (v1 is None) + (v2 is None)
            out.append(None if v1 is None or v2 is None else ((v1 == "A") + (v2 == "B")) / 2)
        return out

    def rate(self, prompts: list[Text], completions: list[str]) -> list[float | None]:
        how = self.instructions("rate")
        replies = self.ask(
            [
                [{"role": "user", "content": RATE.format(prompt=prompt_text(p), response=c, how=how)}]
                for p, c in zip(prompts, completions)
            ]
        )
        ratings = [parse_rating(r) for r in replies]
        self.malformed += sum(r is None for r in ratings)
        return ratings

    def report(self) -> dict:
        return {"judge_calls": self.asked, "judge_malformed": self.malformed}


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> list[list[int]]:
    """Each conversation rendered with the tokenizer's chat template, ready for the assistant's reply. The
    template writes any special tokens itself, so the tokenizer adds none."""
    return [
        tokenizer(
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for c in conversations
    ]


class LocalJudge:
    """A local causal LM answering judge prompts greedily with its chat template."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, batch_size: int = 16, bf16: bool = False):
        from prospect.models.sampling import HFSampler

        self.tokenizer = tokenizer
        self.sampler = HFSampler(model, tokenizer, batch_size=batch_size, bf16=bf16)
        self.max_new_tokens = max_new_tokens

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        from accelerate import PartialState

        from prospect.models.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0)
        show = PartialState().is_main_process
        with Progress("judge verdicts", len(conversations), "verdicts", show=show) as progress:
            out = self.sampler.generate(chat_prompt_ids(self.tokenizer, conversations), params, progress)
        return [self.tokenizer.decode(s[0].token_ids, skip_special_tokens=True) for s in out]


def local_judge(name: str, device: torch.device, bf16: bool) -> LocalJudge:
    """A local model as judge: a path, a run directory (its final/), a hub or an embedded name."""
    from prospect.config import ModelConfig
    from prospect.models.loading import load_model
    from prospect.recipe import run_model

    model, tokenizer = load_model(ModelConfig(name=run_model(name)))
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), typed as the unbound method.
    return LocalJudge(model.to(device), tokenizer, bf16=bf16)  # type: ignore[arg-type]


LOOPBACK = ("localhost", "127.0.0.1", "::1")
RETRIED = (429, 500, 502, 503, 504)  # a busy or failing server: wait and ask again


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the endpoint's own origin: the API key must never reach another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            raise UserError(
                f"HTTP judge {req.full_url}: redirected to {origin(newurl)}, another origin; not followed, so "
                "the API key is not sent there (give the judge's final address)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint. The key is read from an environment variable and
    never printed, logged, put into error messages or sent to another origin; plain http is refused except
    to this machine unless `allow_http`. A busy, failing or unreachable server is asked again with growing
    waits (`retries` times); then the item is labelled failed (an empty reply, counted as malformed) and the
    loop goes on, unless every item failed (`AIJudge.ask`). A refused key or a wrong address stops the
    run with a one-line error."""

    def __init__(
        self,
        base_url: str,
        model: str,
        key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_tokens: int = 256,
        retries: int = 3,
        backoff: float = 1.0,
        allow_http: bool = False,
        options: tuple[str, str] = ("loop.judge_url", "loop.judge_allow_http=true"),
    ):
        """`options`: how the user gives the URL and allows plain http, for the error messages."""
        url_option, allow_option = options
        scheme, host, _ = origin(base_url)
        if scheme not in ("http", "https") or not host:
            raise UserError(f"{url_option}={base_url!r}: expected an http(s) URL such as https://host/v1")
        if scheme == "http" and host not in LOOPBACK and not allow_http:
            raise UserError(
                f"{url_option}={base_url}: plain http would send the API key unencrypted; use https, or set "
                f"{allow_option} for a server you trust on your own network"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key_env, self.timeout, self.max_tokens = model, key_env, timeout, max_tokens
        self.retries, self.backoff = retries, backoff
        self.opener = urllib.request.build_opener(SameOriginRedirects)
        self.failed = 0  # items given up on after the retries

    def __repr__(self) -> str:
        return f"HTTPJudge({self.url!r}, model={self.model!r}, key from ${self.key_env})"

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        key = os.environ.get(self.key_env)
        if not key:
            raise UserError(
                f"HTTP judge: environment variable {self.key_env} is not set (it holds the API key)"
            )
        return [self.ask(conversation, key) for conversation in conversations]

    def ask(self, messages: list[dict], key: str) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                return reply_text(raw)
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRIED:
                    raise UserError(f"HTTP judge {self.url}: HTTP {exc.code} {exc.reason}") from None
                wait = max(wait, retry_after(exc.headers.get("Retry-After")))
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                problem = str(getattr(exc, "reason", exc)) or type(exc).__name__
            if attempt < self.retries:
                log.warning("HTTP judge %s: %s; asking again in %.1f s", self.url, problem, wait)
                time.sleep(min(wait, 60.0))
        log.warning(
            "HTTP judge %s: %s after %d tries; the item is labelled failed",
            self.url,
            problem,
            self.retries + 1,
        )
        self.failed += 1
        return ""


def reply_text(raw: bytes) -> str:
    """The message of a chat-completions reply; "" (a malformed verdict, not a crash) for anything else."""
    try:
        content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        return ""
    return content if isinstance(content, str) else ""


def retry_after(value: str | None) -> float:
    try:
        return min(float(value), 60.0) if value else 0.0
    except ValueError:
        return 0.0
