"""Prompt and completion to token ids, with the tokenizer's own chat template for conversations.

The prompt is rendered with the generation prompt (as at sampling time); the completion is the rest of
the rendered conversation, so it ends with the template's end-of-turn token. Plain text gets EOS appended.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    location: str
    truncated: bool = False


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
        """Both sides share one prompt encoding, truncated as the longer side needs."""
        a = self.encode(prompt, chosen, True, location, fit=False)
        b = self.encode(prompt, rejected, False, location, fit=False)
        longer = a if len(a.completion_ids) >= len(b.completion_ids) else b
        prompt_ids = self.fit(longer).prompt_ids
        room = self.max_length - len(prompt_ids)
        return EncodedPair(
            prompt_ids,
            a.completion_ids[:room],
            b.completion_ids[:room],
            location,
            truncated=len(prompt_ids) + len(longer.completion_ids) > self.max_length,
        )

    def encode(
        self, prompt: Text, completion: Text, label: bool | None, location: str, fit: bool = True
    ) -> Encoded:
        if isinstance(prompt, list):
            prompt_text = self.render(prompt, location, generation_prompt=True)
            full_text = self.render(prompt + completion, location, generation_prompt=False)
            if not full_text.startswith(prompt_text):
                raise UserError(
                    f"{location}: the chat template renders the prompt differently once the "
                    "completion follows it; cannot separate completion tokens"
                )
            prompt_ids, completion_ids = self.ids(prompt_text), self.ids(full_text[len(prompt_text) :])
        else:
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            completion_ids = [*self.ids(completion), self.tokenizer.eos_token_id]
        if not completion_ids:
            raise UserError(
                f"{location}: field 'completion': expected text that encodes to at least one token"
            )
        if self.prompt_suffix is not None:
            prompt_ids = prompt_ids + self.prompt_suffix[bool(label)]
        item = Encoded(prompt_ids, completion_ids, label, location)
        return self.fit(item) if fit else item

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
        return Encoded(prompt, completion, item.label, item.location, truncated=True)

    def render(self, messages: list[dict[str, str]], location: str, generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(
                f"{location}: conversational data needs a tokenizer with a chat template; this one has none"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
