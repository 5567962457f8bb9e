"""A lock on one part of a feature-set directory: two processes never write the same part at once.

``OUT/.lock-<part>`` is created with O_CREAT | O_EXCL (atomic on local filesystems and on NFS v3+
and Lustre) and holds {host, pid, since}; its holder touches it every ``heartbeat`` seconds. A
second process for the same part is refused at once with a message naming the holder, or waits
(``wait=True``) until the lock is free. A lock whose holder is gone is taken over with a warning:
on the same host when its pid no longer runs, on another host when it has not been touched for
``stale_after`` seconds (a crashed node cannot remove its lock; its clock is not trusted, only the
file's mtime on the shared filesystem).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from faster.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT = 30.0  # seconds between touches of a held lock
STALE_AFTER = 600.0  # seconds without a touch after which another host's lock is taken over


class LockHeld(UserError):
    """Another live process writes this part of the directory."""


def lock_name(part: int) -> str:
    return f".lock-{part:05d}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class PartLock:
    """The lock of ``part`` in ``out``; a context manager (``acquire`` / ``release`` by hand too)."""

    def __init__(self, out: str | Path, part: int, *, wait: bool = False, heartbeat: float = HEARTBEAT,
                 stale_after: float = STALE_AFTER, poll: float = 1.0):
        self.path = Path(out) / lock_name(part)
        self.part, self.wait, self.heartbeat, self.stale_after, self.poll = part, wait, heartbeat, stale_after, poll
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record (None when the lock is free or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any] | None) -> str | None:
        """Why the lock's holder is gone, or None when it may still be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if holder is None:
            return f"unreadable lock untouched for {age:.0f} s" if age > self.stale_after else None
        if holder.get("host") == self.me["host"]:
            return None if _alive(int(holder.get("pid", -1))) else f"pid {holder.get('pid')} is not running"
        return f"no heartbeat for {age:.0f} s" if age > self.stale_after else None

    def acquire(self) -> "PartLock":
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                why = self._stale(holder)
                if why is not None:
                    if why != "released":
                        log.warning("%s: taking over the lock of part %d from %s (%s)", self.path.parent, self.part,
                                    _describe(holder), why)
                    self.path.unlink(missing_ok=True)
                    continue
                if not self.wait:
                    raise LockHeld(f"{self.path.parent}: part {self.part} is being written by {_describe(holder)}; "
                                   f"wait for it (--wait), or remove {self.path} if that process is gone") from None
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="faster-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self.holder() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "PartLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def live_locks(out: str | Path) -> list[dict[str, Any]]:
    """Holders of the locks in ``out`` that may still be alive (verify --repair refuses to run beside them)."""
    found = []
    for p in sorted(Path(out).glob(".lock-*")):
        part = p.name.rsplit("-", 1)[-1]
        if not part.isdigit():
            continue
        lock = PartLock(out, int(part))
        holder = lock.holder()
        if lock._stale(holder) is None:
            found.append({"part": int(part), **(holder or {})})
    return found
