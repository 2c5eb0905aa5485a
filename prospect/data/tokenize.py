"""Prompt and completion to token ids, with the tokenizer's own chat template for conversations.

The prompt is rendered with the generation prompt (as at sampling time); the completion is the rest of
the rendered conversation, so it ends with the template's end-of-turn token. Plain text gets EOS appended.
An empty prompt is language modelling ({text}, or a whole conversation): every token is trained on but the
first, which nothing predicts and which stands as the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar, cast

from transformers import PreTrainedTokenizerBase

from prospect.data.formats import Text
from prospect.errors import UserError


@dataclass
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool | None
    location: str
    truncated: bool = False
    rating: float | None = None  # regression target for reward models
    agreement: float | None = None  # the raters' agreement with the label, when the data tells it


@dataclass
class EncodedPrompt:
    prompt_ids: list[int]
    prompt: Text  # kept for reward functions and models that read text
    location: str
    fields: dict | None = None  # the row's other fields, for verifiers (e.g. the reference answer)


@dataclass
class EncodedGroup:
    prompt_ids: list[int]
    completions: list[list[int]]  # best first
    location: str
    scores: list[float] | None = None
    truncated: bool = False


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    location: str
    truncated: bool = False
    agreement: float | None = None  # the share of raters who preferred chosen, when the data tells it


# What a training set holds, one kind per set: the loss's data shape decides which.
TrainingItem = Encoded | EncodedPair | EncodedGroup | EncodedPrompt
Item = TypeVar("Item")


def all_instances(items: list[Any], kind: type[Item]) -> TypeGuard[list[Item]]:
    """Whether every item is a `kind` (a training set holds one kind, chosen by the loss's data shape)."""
    return all(isinstance(it, kind) for it in items)


class Encoder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        max_prompt_length: int,
        truncation: bool = True,
        prompt_suffix: dict[bool, list[int]] | None = None,
    ):
        if max_prompt_length >= max_length:
            raise UserError(
                f"data.max_prompt_length ({max_prompt_length}) must be below data.max_length ({max_length})"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.prompt_suffix = prompt_suffix  # CSFT: control token ids ending the prompt, by label

    def prompt_ids(self, prompt: Text, location: str = "") -> list[int]:
        if isinstance(prompt, list):
            return self.ids(self.render(prompt, location, generation_prompt=True))
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_pair(self, prompt: Text, chosen: Text, rejected: Text, location: str) -> EncodedPair:
        group = self.encode_group(prompt, [chosen, rejected], location)
        chosen_ids, rejected_ids = group.completions
        return EncodedPair(group.prompt_ids, chosen_ids, rejected_ids, location, group.truncated)

    def encode_group(
        self, prompt: Text, completions: list[Text], location: str, scores: list[float] | None = None
    ) -> EncodedGroup:
        """Completions of one prompt sharing one prompt encoding, truncated as the longest one needs."""
        items = [self.encode(prompt, c, None, location, fit=False) for c in completions]
        longest = max(items, key=lambda it: len(it.completion_ids))
        prompt_ids = self.fit(longest).prompt_ids
        room = self.max_length - len(prompt_ids)
        truncated = len(prompt_ids) + len(longest.completion_ids) > self.max_length
        return EncodedGroup(
            prompt_ids, [it.completion_ids[:room] for it in items], location, scores, truncated
        )

    def encode(
        self, prompt: Text, completion: Text, label: bool | None, location: str, fit: bool = True
    ) -> Encoded:
        if not prompt:
            whole = self.whole_ids(completion, location)
            prompt_ids, completion_ids = whole[:1], whole[1:]
        elif isinstance(prompt, list) and isinstance(completion, list):
            prompt_text = self.render(prompt, location, generation_prompt=True)
            full_text = self.render(prompt + completion, location, generation_prompt=False)
            if not full_text.startswith(prompt_text):
                raise UserError(
                    f"{location}: the chat template renders the prompt differently once the "
                    "completion follows it; cannot separate completion tokens"
                )
            prompt_ids, completion_ids = self.ids(prompt_text), self.ids(full_text[len(prompt_text) :])
        elif isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            completion_ids = [*self.ids(completion), self.tokenizer.eos_token_id]
        else:  # parsing aligns the two (formats.align_kinds)
            raise ValueError(f"{location}: prompt and completion must both be text or both be conversations")
        if not completion_ids:
            raise UserError(
                f"{location}: field 'completion': expected text that encodes to at least one token"
            )
        if self.prompt_suffix is not None:
            prompt_ids = prompt_ids + self.prompt_suffix[bool(label)]
        item = Encoded(prompt_ids, completion_ids, label, location)
        return self.fit(item) if fit else item

    def whole_ids(self, text: Text, location: str) -> list[int]:
        """A text as TRL's SFT tokenizes it (special tokens and EOS added), or a rendered conversation."""
        if isinstance(text, list):
            return self.ids(self.render(text, location, generation_prompt=False))
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids if ids and ids[-1] == eos else [*ids, eos]

    def fit(self, item: Encoded) -> Encoded:
        """Keep prompt + completion within max_length: the prompt's end, then the completion's start."""
        total = len(item.prompt_ids) + len(item.completion_ids)
        if total <= self.max_length:
            return item
        if not self.truncation:
            raise UserError(
                f"{item.location}: example has {total} tokens; expected at most data.max_length="
                f"{self.max_length} (or set data.truncation=true)"
            )
        prompt = item.prompt_ids
        if len(prompt) > self.max_prompt_length:
            prompt = prompt[-self.max_prompt_length :]
        completion = item.completion_ids[: self.max_length - len(prompt)]
        return Encoded(prompt, completion, item.label, item.location, True, item.rating)

    def render(self, messages: list[dict[str, str]], location: str, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                f"{location}: conversational data needs a chat template and this tokenizer has none; set "
                "model.chat_template to a Jinja file or a built-in (chatml, zephyr, gemma)"
            )
        # With tokenize=False the template returns the rendered text (transformers types every return kind).
        return cast(
            str,
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            ),
        )

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
