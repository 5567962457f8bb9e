"""Files the project writes and checks: sha256 digests and atomic writes (temporary file, then rename).

Every output of `faster` that another command reads (manifests, failure lists, run directories,
grid indexes, plots) is written through one of these, so a crash or a kill leaves either the old
file or the new one, never half of either. The temporary name is hidden (a leading dot), carries
the writer's pid (two processes never share one) and is removed when the write fails.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from faster.errors import BadFile


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class ChecksumCache:
    """Facts about files (their sha256, and whatever else ``value`` computes), cached in a JSON file
    by absolute path, size and mtime: a changed file is looked at again, an unchanged one never twice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def value(self, file: str | Path, key: str, compute: Callable[[Path], Any]) -> Any:
        """``compute(file)``, or its cached value while the file keeps its size and mtime."""
        file = Path(file)
        st = file.stat()
        name = str(file.resolve())
        entry = self.entries.get(name)
        if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = self.entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if key not in entry:
            entry[key] = compute(file)
            self.dirty = True
        return entry[key]

    def sha256(self, file: str | Path) -> str:
        return self.value(file, "sha256", sha256_file)

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.entries)
            self.dirty = False


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, from the per-user cache while its size and mtime are unchanged (weights files
    of several GB are hashed once, not at every start; a changed file is hashed again)."""
    cache = user_cache()
    try:
        return cache.sha256(path)
    finally:
        cache.save()


def user_cache(name: str = "checksums.json") -> ChecksumCache:
    """The per-user cache of file facts: $FASTER_CACHE_DIR/NAME, default ~/.cache/faster/NAME."""
    root = os.environ.get("FASTER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "faster")
    return ChecksumCache(Path(root) / name)


def replace_atomically(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save says "file write failed", not ENOSPC: name it
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if getattr(err, "errno", None) != errno.ENOSPC and _nearly_full(path.parent, written):
            raise OSError(errno.ENOSPC, f"No space left on device ({type(err).__name__}: {err})", str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def describe_path(path: str | Path) -> str:
    """What is at ``path``, for messages: "no such file or directory", "a directory", "a FIFO (named
    pipe)", "a socket", "a device", "a broken symbolic link", ...: say what a path is, not just that it
    is not the file wanted."""
    import stat

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "no such file or directory"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file")):
        if test(mode):
            return what
    return "not a regular file"


def _nearly_full(folder: Path, written: int) -> bool:
    """Whether a failed write into ``folder`` is explained by a full disk (less free than what was
    written, or under 1 MiB)."""
    try:
        return shutil.disk_usage(folder).free <= max(written, 1 << 20)
    except OSError:
        return False


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json(path: str | Path, obj: Any, *, fsync: bool = False) -> Path:
    """Write ``obj`` as indented JSON (keys sorted), atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", fsync=fsync)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")

    return replace_atomically(path, write)


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and flush it (a line cut short by a kill is skipped by ``read_jsonl``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


def read_json(path: str | Path) -> Any | None:
    """The parsed file, or None when it does not exist; ValueError naming a file that is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise BadFile(f"{str(path)!r} is not valid JSON: {err}") from err


def read_jsonl(path: str | Path) -> list[Any]:
    """The objects of a JSON-lines file ([] when absent); a line cut short by a crash is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows
