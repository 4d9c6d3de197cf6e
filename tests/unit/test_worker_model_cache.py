"""The cache of de-quantized GGUF models: one entry per (content, dtype), written atomically, bounded.

No model is converted: a small fake GGUF file stands in for the model file, and a fake model whose
`save_pretrained` writes a config.json stands in for the de-quantized one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from distserve_operator import cli
from distserve_worker import model_cache
from distserve_worker.model_source import (
    ModelSpec,
    _converted_dir,
    _effective,
    _save_converted,
    resolve_model_source,
)

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTSERVE_CACHE_KEEP", raising=False)
    return tmp_path / "cache" / "gguf"


def fake_gguf(path: Path, content: bytes = b"GGUF fake weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


class FakeModel:
    """What `_save_converted` needs of a transformers model: a config and `save_pretrained`."""

    def __init__(self, payload: bytes = b"w" * 100, fail: bool = False) -> None:
        self.config = type("Config", (), {})()
        self.payload, self.fail = payload, fail

    def save_pretrained(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(self.payload)
        if self.fail:
            raise OSError(28, "No space left on device")
        (Path(path) / "config.json").write_text("{}")


class FakeTokenizer:
    def save_pretrained(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


def convert(gguf: Path, dtype: str = "float32", model: Any = None) -> Path:
    """What `load_model` does after loading a GGUF file: save its converted copy."""
    spec = ModelSpec("m", "GGUF", str(gguf), dtype)
    target = _converted_dir(resolve_model_source(spec), dtype)
    _save_converted(model or FakeModel(), FakeTokenizer(), target, gguf, dtype)
    return target


def test_same_content_under_two_paths_is_one_entry(tmp_path: Path, cache: Path) -> None:
    # Two clones (or virtualenvs) installing the same package: one copy, which both then load.
    first = fake_gguf(tmp_path / "venv-a" / "m.gguf")
    second = fake_gguf(tmp_path / "venv-b" / "m.gguf")
    assert convert(first) == convert(second)
    assert [e.key for e in model_cache.entries(cache)] == [convert(first).name]
    for gguf in (first, second):
        load = _effective(ModelSpec("m", "GGUF", str(gguf)))
        assert load.gguf_file is None and Path(load.pretrained).parent == cache


def test_each_dtype_is_its_own_entry(tmp_path: Path, cache: Path) -> None:
    gguf = fake_gguf(tmp_path / "m.gguf")
    assert convert(gguf, "float32") != convert(gguf, "bfloat16")
    assert sorted(e.dtype for e in model_cache.entries(cache)) == ["bfloat16", "float32"]


def test_a_changed_file_gets_a_new_key(tmp_path: Path) -> None:
    gguf = fake_gguf(tmp_path / "m.gguf", b"version 1")
    before = convert(gguf)
    fake_gguf(gguf, b"version 2 (a different size)")
    after = convert(gguf)
    assert before != after
    # And back to the first content (new mtime): the first entry again, found by content.
    fake_gguf(gguf, b"version 1")
    assert _converted_dir(resolve_model_source(ModelSpec("m", "GGUF", str(gguf))), "float32") == before


def test_the_digest_is_hashed_once_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = fake_gguf(tmp_path / "m.gguf")
    hashed: list[Path] = []
    real = model_cache.hash_file
    monkeypatch.setattr(model_cache, "hash_file", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        model_cache.file_digest(gguf)
    assert len(hashed) == 1
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again
    model_cache.file_digest(gguf)
    assert len(hashed) == 2


def test_a_failed_conversion_leaves_nothing(tmp_path: Path, cache: Path) -> None:
    gguf = fake_gguf(tmp_path / "m.gguf")
    target = convert(gguf, model=FakeModel(fail=True))  # the disk fills up mid-save
    assert not target.exists() and model_cache.entries(cache) == []
    assert [p.name for p in cache.iterdir()] == [model_cache.DIGESTS_FILE]  # no temp dir either
    # The load still uses the GGUF file, and the next conversion succeeds.
    assert _effective(ModelSpec("m", "GGUF", str(gguf))).gguf_file == "m.gguf"
    assert model_cache.is_complete(convert(gguf))


def test_losing_the_race_keeps_the_winners_copy(tmp_path: Path, cache: Path) -> None:
    target = cache / "d-float32"

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text('{"writer": "loser"}')
        # Meanwhile another process finishes the same entry first.
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"writer": "winner"}')

    assert model_cache.publish(target, write, {"model": "m.gguf", "dtype": "float32"}) == target
    assert json.loads((target / "config.json").read_text()) == {"writer": "winner"}
    assert [p.name for p in cache.iterdir()] == ["d-float32"]


def make_entry(cache: Path, key: str, size: int, used_ago_s: float) -> None:
    entry = cache / key
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"\0" * size)
    (entry / model_cache.META_FILE).write_text(json.dumps({"model": f"{key}.gguf", "dtype": "float32"}))
    marker = entry / model_cache.LAST_USED_FILE
    marker.touch()
    used = time.time() - used_ago_s
    os.utime(marker, (used, used))


def test_prune_removes_the_least_recently_used_first(cache: Path) -> None:
    make_entry(cache, "old", MiB, used_ago_s=3000)
    make_entry(cache, "middle", MiB, used_ago_s=2000)
    make_entry(cache, "new", MiB, used_ago_s=1000)
    assert [e.key for e in model_cache.entries(cache)] == ["new", "middle", "old"]
    # Loading "old" makes it the most recently used.
    model_cache.touch(cache / "old")
    removed = model_cache.prune(cache, max_bytes=2 * MiB + 4096)
    assert [e.key for e in removed] == ["middle"]
    assert [e.key for e in model_cache.entries(cache)] == ["old", "new"]
    assert [e.key for e in model_cache.prune(cache, everything=True)] == ["new", "old"]
    assert list(cache.iterdir()) == []


def test_a_new_conversion_prunes_beyond_the_bound(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_entry(cache, "oldest", 10, used_ago_s=3000)
    make_entry(cache, "older", 10, used_ago_s=2000)
    make_entry(cache, "in-use", 10, used_ago_s=1)  # another worker is loading it right now
    monkeypatch.setenv("DISTSERVE_CACHE_KEEP", "2")
    new = convert(fake_gguf(tmp_path / "m.gguf"))
    assert [e.key for e in model_cache.entries(cache)] == [new.name, "in-use"]
    monkeypatch.setenv("DISTSERVE_CACHE_KEEP", "0")  # off
    make_entry(cache, "old", 10, used_ago_s=3000)
    convert(fake_gguf(tmp_path / "m2.gguf", b"another model"))
    assert len(model_cache.entries(cache)) == 4


def test_cli_ls_and_prune(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_entry(cache, "aaa-float32", 3 * MiB, used_ago_s=3000)
    make_entry(cache, "bbb-float32", 2 * MiB, used_ago_s=10)
    legacy = cache / "SmolLM2-135M-Instruct.Q4_1-float32-0123456789abcdef"  # keyed by path and mtime
    legacy.mkdir()
    os.utime(legacy, (time.time() - 5000, time.time() - 5000))
    assert cli.main(["cache", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KEY", "MODEL", "DTYPE", "SIZE", "LAST", "USED"]
    assert lines[1].split()[:4] == ["bbb-float32", "bbb-float32.gguf", "float32", "2.0"]
    assert lines[2].split()[:4] == ["aaa-float32", "aaa-float32.gguf", "float32", "3.0"]
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (old key)" in lines[3]
    assert lines[-1] == f"3 entries, 5.0 MiB in {cache}"

    assert cli.main(["cache", "ls", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)["entries"]
    assert [e["key"] for e in listed][:2] == ["bbb-float32", "aaa-float32"]
    assert listed[0]["sizeBytes"] > 2 * MiB

    assert cli.main(["cache", "prune", "--max-bytes", "4MiB"]) == 0
    out = capsys.readouterr().out
    assert "removed aaa-float32" in out and "removed SmolLM2" in out and "1 left" in out
    assert cli.main(["cache", "prune", "--all"]) == 0
    assert "1 removed" in capsys.readouterr().out and model_cache.entries(cache) == []


def test_cli_rejects_a_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["cache", "prune", "--max-bytes", "lots"])
    assert "not a size" in capsys.readouterr().err
