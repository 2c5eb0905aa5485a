"""`model.chat_template`: a chat template for a model that has none (a base model) or another one, given as a
Jinja file or a built-in name. The built-ins are the published templates, text only:

- `chatml`: `<|im_start|>role ... <|im_end|>` (Qwen, SmolLM2, many fine-tunes); best where the vocabulary has
  both markers as tokens, else they are learnt as plain text.
- `zephyr`: `<|user|>` / `<|assistant|>` headers, each turn ended by the tokenizer's EOS token, so it works
  with any vocabulary and generation stops at EOS.
- `gemma`: Gemma's `<start_of_turn>user|model ... <end_of_turn>`, BOS first (Gemma base models ship the
  turn tokens without a template).

The template goes into the tokenizer, so final/ carries it. Generation stops at the end-of-turn marker where
it is a special token of the vocabulary (see sampling.stop_tokens), else at EOS.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from prospect.errors import UserError, first_line

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (template, turn markers)
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
    "zephyr": (ZEPHYR, ()),
    "gemma": (GEMMA, ("<start_of_turn>", "<end_of_turn>")),
}
PROBE = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


def read_template(option: str) -> tuple[str, tuple[str, ...]]:
    """(template, turn markers) of a built-in name or a Jinja file."""
    if option in BUILTIN:
        return BUILTIN[option]
    path = Path(option).expanduser()
    if not path.is_file():
        raise UserError(
            f"model.chat_template={option}: no such file and not a built-in template ({', '.join(BUILTIN)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"model.chat_template={option}: expected a UTF-8 Jinja template") from None
    if not text.strip():
        raise UserError(f"model.chat_template={option}: the file is empty; expected a Jinja chat template")
    return text, ()


def set_chat_template(tokenizer: PreTrainedTokenizerBase, option: str) -> None:
    """Give the tokenizer the template `option` names; it must render a user/assistant exchange."""
    template, markers = read_template(option)
    if getattr(tokenizer, "chat_template", None) and tokenizer.chat_template != template:
        log.info("model.chat_template=%s replaces the tokenizer's own chat template", option)
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template(PROBE, tokenize=False)
    except Exception as exc:  # jinja2's syntax and undefined errors, the template's raise_exception
        raise UserError(
            f"model.chat_template={option}: cannot render a user/assistant exchange ({first_line(exc)})"
        ) from None
    missing = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        log.warning(
            "model.chat_template=%s: %s not one token of this vocabulary; the model learns it as text and "
            "generation stops only at EOS (the 'zephyr' template ends each turn with EOS)",
            option,
            " and ".join(missing) + (" is" if len(missing) == 1 else " are"),
        )
