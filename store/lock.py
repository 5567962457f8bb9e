"""Exclusive locks held by one file on a shared filesystem: a part of a feature-set directory (two
processes never write the same part at once), a cell of an ablation grid, a grid's index.

A lock is a file created with O_CREAT | O_EXCL holding {host, pid, start, since, token}; its holder
touches it every ``heartbeat`` seconds. Exclusive create is atomic on local filesystems, on NFS v3
and later (the client sends an EXCLUSIVE CREATE with a verifier, so a retransmitted request cannot
make two winners) and on Lustre (the metadata server serialises creates in a directory); a
directory is never read to decide who holds a lock. A second process is refused at once with a
message naming the holder, or waits (``wait=True``) until the lock is free. A lock whose holder is
gone is taken over with a warning: on the same host when its pid no longer runs (or now names
another process: the record keeps the holder's start time), on another host when it has not been
touched for ``stale_after`` seconds (a crashed node cannot remove its lock; its own clock is not
read, only the file's mtime that the shared filesystem's server set; clocks within minutes of each
other, as NTP keeps them, are enough against the default ten minutes).

A takeover renames the stale file to a name of the taker's own (rename is atomic on all three
filesystems) and checks that it holds the record it judged stale, so two processes taking over one
lock at once never both win, and a fresh lock created meanwhile is put back (``os.link``, which
refuses to replace a file) instead of being removed. A holder whose file was taken over anyway
(it stalled past ``stale_after``) sees it at its next heartbeat: ``lost`` is set, ``still_held()``
is False.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from faster.errors import BadFile, UserError

log = logging.getLogger(__name__)

HEARTBEAT = 30.0  # seconds between touches of a held lock
STALE_AFTER = 600.0  # seconds without a touch after which another host's lock is taken over


class LockHeld(UserError):
    """Another live process holds this lock (writes this part of the directory, trains this cell)."""


def lock_name(part: int) -> str:
    return f".lock-{part:05d}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host and, when ``start`` is known, is the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


class FileLock:
    """An exclusive lock held by the file ``path``; a context manager (``acquire`` / ``try_acquire`` /
    ``release`` by hand too). ``what`` names it in messages ("the lock of part 3", "the claim of cell X")."""

    def __init__(self, path: str | Path, *, what: str | None = None, wait: bool = False,
                 heartbeat: float = HEARTBEAT, stale_after: float = STALE_AFTER, poll: float = 1.0):
        self.path = Path(path)
        self.what = what or f"the lock {self.path.name}"
        self.wait, self.heartbeat, self.stale_after, self.poll = wait, heartbeat, stale_after, poll
        pid = os.getpid()
        self.me = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self.lost = False  # set by the heartbeat when another process took the lock over

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record (None when the lock is free or unreadable)."""
        return _read_record(self.path)

    def still_held(self) -> bool:
        """Whether this object holds the lock and its file still names it (not taken over)."""
        return self.held and (self.holder() or {}).get("token") == self.me["token"]

    def _stale(self, holder: dict[str, Any] | None) -> str | None:
        """Why the lock's holder is gone, or None when it may still be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if holder is None:
            return f"unreadable lock untouched for {age:.0f} s" if age > self.stale_after else None
        if holder.get("host") == self.me["host"]:
            try:
                pid, start = int(holder.get("pid", -1)), holder.get("start")
            except (TypeError, ValueError):
                pid, start = -1, None
            if pid > 0 and _alive(pid, start if isinstance(start, int) else None):
                return None
            return f"pid {holder.get('pid')} is not running"
        return f"no heartbeat for {age:.0f} s" if age > self.stale_after else None

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        return f"{self.what} is held by {describe(holder)}; remove {self.path} if that process is gone"

    def _create(self) -> bool:
        """One atomic attempt to create the lock file with this process's record."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:  # a read-only or full filesystem, a folder without write permission
            raise BadFile(f"{self.path.parent}: cannot write here ({err.strerror}); use a writable output "
                          "directory") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _take_over(self, holder: dict[str, Any] | None, why: str) -> None:
        """Remove the stale lock judged from ``holder``, never a fresher one created meanwhile."""
        if why == "released":
            return
        private = self.path.with_name(f"{self.path.name}.takeover-{self.me['token']}")
        try:
            os.rename(self.path, private)
        except FileNotFoundError:
            return  # another process took it over (or its holder released it) first
        taken = _read_record(private)
        if taken == holder:
            log.warning("%s: taking over %s from %s (%s)", self.path.parent, self.what, describe(holder), why)
            private.unlink(missing_ok=True)
            return
        try:  # a lock created after our look: give it back (link never replaces a file)
            os.link(private, self.path)
        except FileExistsError:
            log.warning("%s: %s of %s was replaced while it was taken over", self.path.parent, self.what,
                        describe(taken))
        except OSError:  # a filesystem without hard links: rename back, the best that is left
            os.replace(private, self.path)
        private.unlink(missing_ok=True)

    def try_acquire(self) -> bool:
        """Take the lock if it is free or its holder is gone; False when a live process holds it."""
        assert not self.held, f"{self.path} is already held by this object"
        while not self._create():
            holder = self.holder()
            why = self._stale(holder)
            if why is None:
                return False
            self._take_over(holder, why)
        self.held, self.lost = True, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="faster-lock-heartbeat", daemon=True)
        self._thread.start()
        return True

    def acquire(self) -> FileLock:
        """Take the lock; a live holder means LockHeld, or (``wait``) polling until it is free."""
        while not self.try_acquire():
            if not self.wait:
                raise LockHeld(self._refusal(self.holder()))
            time.sleep(self.poll)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if (self.holder() or {}).get("token") != self.me["token"]:
                log.warning("%s: %s was taken over by %s", self.path.parent, self.what, describe(self.holder()))
                self.lost = True
                return
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
        if (self.holder() or {}).get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class PartLock(FileLock):
    """The lock of ``part`` in the feature-set directory ``out`` (``OUT/.lock-<part>``)."""

    def __init__(self, out: str | Path, part: int, *, wait: bool = False, heartbeat: float = HEARTBEAT,
                 stale_after: float = STALE_AFTER, poll: float = 1.0):
        super().__init__(Path(out) / lock_name(part), what=f"the lock of part {part}", wait=wait,
                         heartbeat=heartbeat, stale_after=stale_after, poll=poll)
        self.part = part

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        return (f"{self.path.parent}: part {self.part} is being written by {describe(holder)}; "
                f"wait for it (--wait), or remove {self.path} if that process is gone")


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    """A lock holder's record in words: "pid P on HOST since TIME"."""
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def live_locks(out: str | Path) -> list[dict[str, Any]]:
    """Holders of the locks in ``out`` that may still be alive (verify --repair refuses to run beside them)."""
    found = []
    for p in sorted(Path(out).glob(".lock-*")):
        part = p.name.rsplit("-", 1)[-1]
        if not part.isdigit() or p.name != lock_name(int(part)):  # not a takeover's transient name
            continue
        lock = PartLock(out, int(part))
        holder = lock.holder()
        if lock._stale(holder) is None:
            found.append({"part": int(part), **(holder or {})})
    return found
