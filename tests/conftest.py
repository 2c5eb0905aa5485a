"""Shared fixtures: the tiny model and tokenizer (tests/helpers.py builds them) and a small feedback file."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tests.helpers import build_model, build_tokenizer, unpaired_rows, write_jsonl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer, loadable by name like any local checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def kto_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "feedback.jsonl", unpaired_rows())
