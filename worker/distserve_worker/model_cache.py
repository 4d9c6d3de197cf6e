"""The cache of de-quantized GGUF models: one directory per (file content, dtype), bounded.

Layout, under `cache_dir()/gguf` (`$DISTSERVE_CACHE_DIR`, default `~/.cache/distserve`):

- `<digest>-<dtype>/`: one entry, a `save_pretrained` directory. The digest is the GGUF file's
  xxh3-128 content hash, so the same file installed in any number of clones or virtualenvs shares
  one copy, and a changed file gets a new one. `distserve-cache.json` in it says what it holds;
  the mtime of its `.last-used` marker is when a load last read it.
- `.digests.json`: the digest of each file hashed so far, valid while its size and mtime stay the
  same, so a load hashes a file once, not every time.
- `.tmp-*`: an entry being written. It becomes an entry by one `os.rename`, so nobody ever reads a
  half-written copy; a process that loses the race to another one writing the same entry drops
  its own copy and uses the winner's.

Entries are removed least recently used first: after each new conversion beyond
`$DISTSERVE_CACHE_KEEP` entries (default 2; 0 turns this off), and by `distserve cache prune`.
This module needs neither torch nor transformers (`distserve cache` imports it alone).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

META_FILE = "distserve-cache.json"
LAST_USED_FILE = ".last-used"
DIGESTS_FILE = ".digests.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DEFAULT_KEEP = 2
# Automatic pruning spares entries read this recently: another process may be loading one now.
RECENT_USE_SECONDS = 60.0
# A temp dir this old belongs to a writer that died; `prune` removes it.
STALE_TMP_SECONDS = 3600.0
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def cache_dir() -> Path:
    return Path(os.environ.get("DISTSERVE_CACHE_DIR") or Path.home() / ".cache" / "distserve")


def gguf_root() -> Path:
    """Where converted GGUF copies live."""
    return cache_dir() / "gguf"


def auto_keep() -> int:
    """Entries kept after a new conversion ($DISTSERVE_CACHE_KEEP; 0: never prune automatically)."""
    raw = os.environ.get("DISTSERVE_CACHE_KEEP", "")
    try:
        return max(0, int(raw)) if raw.strip() else DEFAULT_KEEP
    except ValueError:
        log.warning("DISTSERVE_CACHE_KEEP=%r is not a whole number; keeping %d", raw, DEFAULT_KEEP)
        return DEFAULT_KEEP


# ---- content digest ------------------------------------------------------------------------------


def hash_file(path: Path) -> str:
    """The xxh3-128 hex digest of the file's content, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


_DIGESTS_SEEN: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest, this process


def file_digest(path: Path, root: Path | None = None) -> str:
    """The file's content digest, remembered in `root`'s sidecar per (path, size, mtime)."""
    root = gguf_root() if root is None else root
    resolved = str(Path(path).resolve())
    stat = os.stat(resolved)
    stamp = [stat.st_size, stat.st_mtime_ns]
    # A worker asks several times while it starts (config, tokenizer, weights): hash at most once
    # per process even where the sidecar cannot be written (a read-only home).
    seen = _DIGESTS_SEEN.get((resolved, *stamp))
    if seen is not None:
        return seen
    known = _read_digests(root)
    entry = known.get(resolved)
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp:
        _DIGESTS_SEEN[(resolved, *stamp)] = str(entry[2])
        return str(entry[2])
    digest = hash_file(Path(resolved))
    _DIGESTS_SEEN[(resolved, *stamp)] = digest
    # Forget files that are gone, so the sidecar stays as small as the set of files in use.
    known = {p: v for p, v in known.items() if os.path.exists(p)}
    known[resolved] = [*stamp, digest]
    _write_json_atomically(root / DIGESTS_FILE, known)
    return digest


def _read_digests(root: Path) -> dict[str, list[object]]:
    try:
        data = json.loads((root / DIGESTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomically(path: Path, data: object) -> None:
    """Best effort: a read-only cache only means hashing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not write %s: %s", path, exc)


# ---- entries -------------------------------------------------------------------------------------


def entry_key(digest: str, dtype: str) -> str:
    return f"{digest}-{dtype}"


def is_complete(entry: Path) -> bool:
    return (entry / "config.json").is_file()


def touch(entry: Path) -> None:
    """Record a use of the entry (its LRU position); a read-only cache is still readable."""
    with contextlib.suppress(OSError):
        (entry / LAST_USED_FILE).touch()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    model: str
    dtype: str
    size_bytes: int
    last_used: float  # seconds since the epoch

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "path": str(self.path),
            "model": self.model,
            "dtype": self.dtype,
            "sizeBytes": self.size_bytes,
            "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
        }


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry, most recently used first. Directories of older versions (keyed by path and
    mtime, without metadata) are listed too, so pruning removes them."""
    root = gguf_root() if root is None else root
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            meta = _legacy_meta(path.name)
        found.append(
            Entry(
                key=path.name,
                path=path,
                model=str(meta.get("model", "?")),
                dtype=str(meta.get("dtype", "?")),
                size_bytes=_tree_bytes(path),
                last_used=_last_used(path),
            )
        )
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def _legacy_meta(name: str) -> dict[str, str]:
    """What the name of an entry keyed by path and mtime (before content digests) says."""
    match = re.fullmatch(r"(.+)-([a-z0-9]+)-[0-9a-f]{16}", name)
    return {"model": f"{match[1]}.gguf (old key)", "dtype": match[2]} if match else {}


def _last_used(entry: Path) -> float:
    for marker in (entry / LAST_USED_FILE, entry / "config.json", entry):
        try:
            return marker.stat().st_mtime
        except OSError:
            continue
    return 0.0


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def publish(target: Path, write: Callable[[Path], None], meta: dict[str, object]) -> Path:
    """Make `target` an entry holding what `write(tmp_dir)` writes, atomically.

    `write` fills a temp dir beside `target`, which is then renamed into place. If it raises,
    nothing is left behind. If another process published `target` first, its copy is kept and
    ours dropped. After a new entry, the oldest beyond `auto_keep()` are pruned."""
    if is_complete(target):
        touch(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        write(tmp)
        (tmp / META_FILE).write_text(json.dumps({**meta, "created": time.time()}))
        (tmp / LAST_USED_FILE).touch()
        try:
            os.rename(tmp, target)
        except OSError as exc:
            # Renaming a directory onto a non-empty one fails: another process won the race.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not is_complete(target):
                raise
            touch(target)
            return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keep = auto_keep()
    if keep:
        removed = prune(target.parent, keep=keep, protect={target.name}, spare_recent_s=RECENT_USE_SECONDS)
        for entry in removed:
            log.info(
                "model cache: removed %s (%s, %s), least recently used", entry.key, entry.model, entry.dtype
            )
    return target


def prune(
    root: Path | None = None,
    *,
    max_bytes: int | None = None,
    keep: int | None = None,
    everything: bool = False,
    protect: Iterable[str] = (),
    spare_recent_s: float = 0.0,
) -> list[Entry]:
    """Remove entries least recently used first while they hold more than `max_bytes`, or number
    more than `keep` (or all of them). Entries named in `protect`, and those used within
    `spare_recent_s`, stay. Returns what was removed."""
    root = gguf_root() if root is None else root
    protected = set(protect)
    listed = entries(root)
    total, count = sum(e.size_bytes for e in listed), len(listed)
    now = time.time()
    removed = []
    for entry in reversed(listed):  # least recently used first
        over = (
            everything or (max_bytes is not None and total > max_bytes) or (keep is not None and count > keep)
        )
        if not over:
            break
        if entry.key in protected or now - entry.last_used < spare_recent_s:
            continue
        if _remove(entry.path):
            removed.append(entry)
            total -= entry.size_bytes
            count -= 1
    _remove_stale_tmp(root, now)
    return removed


def _remove(path: Path) -> bool:
    """Rename out of the way first, so a reader never finds a half-deleted entry."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError as exc:
        log.warning("model cache: could not remove %s: %s", path, exc)
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _remove_stale_tmp(root: Path, now: float) -> None:
    if not root.is_dir():
        return
    for path in root.iterdir():
        if not path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        try:
            if now - path.stat().st_mtime < STALE_TMP_SECONDS:
                continue
        except OSError:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
