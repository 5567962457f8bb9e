"""Decoding videos in worker processes for extraction and predict (README "faster extract").

``DecodePool`` decodes each video in one of ``workers`` processes so that decoding overlaps the
model and a decoder that hangs (decord can, holding the GIL: docs/pitfalls.md) or dies is killed after
``timeout`` s and replaced; the other videos it had queued go to other workers. With ``decoder``
"auto" the video is decoded once more with the other decoder, and reported as
Failed(stage="timeout" / "crash"), holding both tries, only when that fails too. Each worker owns
``prefetch`` frame buffers in shared memory (pipes when /dev/shm is too small): it decodes the
next video while the main process copies out the last. Workers are recycled every ``recycle_every`` videos (decord leaks a little).
``InlineDecoder`` (``workers=0``) decodes in the calling process, without overlap or timeout.

Both take the clips to decode as one faster.sampling.Sampling (or, ``samplings``, one per item of
that shape: train-clip's random clip of each video) and the ``decoder`` (auto, decord
or pyav), decode each video with ``faster.extract.video.decode_clips``, iterate over Decoded /
Failed results (``for r in decoder``) and close as context managers. Around each decode the
process's stderr (file descriptor 2, where decord's C++ log and FFmpeg write) goes to a file: a
video that fails has the end of it in its failure record ("log"), one that decodes drops it.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadValue
from faster.extract import video
from faster.sampling import Sampling

log = logging.getLogger(__name__)

LOG_CHARS = 2000  # the end of a failed video's captured decoder output kept in its failure record


@contextmanager
def captured_stderr(sink: Any) -> Iterator[dict[str, str]]:
    """Send file descriptor 2 (where decord's C++ log and FFmpeg write) to the open binary file ``sink``.

    Yields a dict whose "text" is, once the block ends, what was written there meanwhile (the last
    LOG_CHARS characters). Python's ``sys.stderr`` is flushed on both sides so its own lines stay
    in order. The redirect is process-wide: decode in a process (or a moment) where nothing else
    writes to stderr that must be seen; callers log what they drop at debug level.
    """
    got: dict[str, str] = {"text": ""}
    sys.stderr.flush()
    sink.seek(0)
    sink.truncate()
    saved = os.dup(2)
    try:
        os.dup2(sink.fileno(), 2)
        yield got
    finally:
        try:
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        got["text"] = _tail(sink)


def _tail(sink: Any) -> str:
    sink.flush()
    sink.seek(0, os.SEEK_END)
    size = sink.tell()
    sink.seek(max(0, size - 4 * LOG_CHARS))
    return sink.read().decode("utf-8", "replace")[-LOG_CHARS:].strip()


def read_log(path: str | None) -> str:
    """The end of a decode log file (a worker killed mid-decode leaves its output there)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return _tail(f)
    except OSError:
        return ""


def _failure_extra(err: BaseException, text: str) -> dict[str, Any]:
    """What a failure record holds besides stage and error: each decoder's error, the decoder's log."""
    extra: dict[str, Any] = {}
    if getattr(err, "errors", None):
        extra["errors"] = dict(err.errors)
    if text:
        extra["log"] = text
    return extra


def _decode_one(path: str, sampling: Sampling, decoder: str, sink: Any, video_id: str,
                out: np.ndarray | None = None):
    """("ok", DecodedVideo) or ("err", stage, error, extra): one decode with stderr captured into ``sink``."""
    with captured_stderr(sink) as captured:
        try:
            d = video.decode_clips(path, sampling, out=out, decoder=decoder)
        except video.DecodeError as err:
            result = ("err", err.stage, str(err), err)
        except Exception as err:  # any other decoder error is this video's, not the extraction's
            result = ("err", "decode", video.short_error(err), err)
        else:
            result = ("ok", d)
    if result[0] == "ok":
        if captured["text"]:
            log.debug("%s: decoder output (dropped, the video decoded): %s", video_id, captured["text"])
        if result[1].fallback:
            d = result[1]
            log.info("%s: %s failed (%s); read with %s", video_id, "pyav" if d.decoder == "decord" else "decord",
                     d.fallback, d.decoder)
        return result
    return ("err", result[1], result[2], _failure_extra(result[3], captured["text"]))


def _decode_worker(conn, sampling: Sampling, decoder: str, log_path: str | None, buffer_names: list[str]) -> None:
    """A decode process: receives (task_id, path, buffer, id), decodes into the shared buffer, replies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops us
    from multiprocessing import shared_memory

    shms = [shared_memory.SharedMemory(name=n) for n in buffer_names]
    arrays = [np.ndarray(sampling.shape, dtype=np.uint8, buffer=s.buf) for s in shms]
    sink = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    conn.send(("ready", {"pid": os.getpid(), "torch": "torch" in sys.modules}))  # no torch: tests check it
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                break
            _, task_id, path, buf, video_id, own, retry_with = msg
            out = arrays[buf] if arrays else None
            r = _decode_one(path, own or sampling, retry_with or decoder, sink, video_id, out=out)
            if r[0] == "ok":
                d = r[1]
                conn.send(("ok", task_id, {"num_frames": d.num_frames, "fps": d.fps, "clip_start": d.clip_start,
                                           "short": d.short, "decoder": d.decoder}))
                if not arrays:  # pipe transport: the frames follow as raw bytes
                    conn.send_bytes(memoryview(d.frames).cast("B"))
            else:
                conn.send(("err", task_id, r[1], r[2], r[3]))
    finally:
        sink.close()
        del arrays
        for s in shms:
            s.close()


WORKER_MODULES = ["numpy", "PIL.Image", "decord", "av", "faster.extract.decoders"]  # what a decode worker imports


def mp_context():
    """The start method of decode workers: a forkserver that has imported WORKER_MODULES once (a clean
    process, never a fork of one holding CUDA or OpenMP state), spawn where there is no forkserver.

    The workers import no torch (decoding, resize and crop are numpy, Pillow, decord and PyAV): the
    forkserver starts in a fraction of a second instead of importing torch a second time while the
    main process imports it and builds the backbones.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def warm_up_workers() -> None:
    """Start the forkserver now so its imports overlap the main process's model building."""
    ctx = mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with _main_not_reimported(ignore_signals=True):
            forkserver.ensure_running()


@contextmanager
def _main_not_reimported(ignore_signals: bool = False):
    """Start a forkserver/spawn child without re-running ``__main__`` in it (with ``ignore_signals``:
    with SIGINT and SIGTERM ignored while it is spawned).

    The decode worker lives in this module and needs nothing from the caller's script, so scripts
    without the ``if __name__ == "__main__"`` guard, stdin and notebooks work too. A child started
    while a signal is ignored keeps ignoring it (an ignored disposition survives fork and exec,
    and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored): Ctrl-C or
    a scheduler's SIGTERM to the whole process group then reaches only the main process, which
    stops its workers itself (they and the forkserver also exit when it dies: their pipes close).
    Without this a Ctrl-C printed the forkserver's KeyboardInterrupt traceback, and a group SIGTERM
    killed the forkserver while the pool was starting workers (EOFError in the main process).
    Only the spawn of the forkserver itself needs it (``warm_up_workers``; the workers are forked
    by the forkserver and inherit its dispositions), so the main process ignores signals for a few
    milliseconds only; dispositions can only change in the main thread.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    ignore = ignore_signals and threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if ignore else {}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _jobs(items: list[video.VideoItem], sampling: Sampling,
          samplings: list[Sampling] | None) -> list[tuple[int, video.VideoItem, Sampling | None]]:
    """(index, item, its own sampling or None) per item; every own sampling must decode to ``sampling.shape``."""
    if samplings is None:
        return [(i, item, None) for i, item in enumerate(items)]
    if len(samplings) != len(items):
        raise BadValue(f"{len(samplings)} samplings for {len(items)} videos: give one per video")
    for s in samplings:
        if s.shape != sampling.shape:
            raise BadValue(f"a video's sampling decodes {s.shape}, the decoder's buffers hold {sampling.shape}")
    return list(zip(range(len(items)), items, samplings))


@dataclass
class Decoded:
    """A decoded video handed to the model loop: ``frames`` is a (N, L, S, S, 3) uint8 tensor."""

    item: video.VideoItem
    frames: Any
    num_frames: int
    fps: float
    clip_start: list[int]
    short: bool
    decoder: str = "decord"  # which decoder read it (video.DecodedVideo.decoder)
    index: int = -1  # the item's position in the list given to the decoder


@dataclass
class Failed:
    item: video.VideoItem
    stage: str
    error: str
    extra: dict[str, Any] = field(default_factory=dict)  # for the failure record: "errors" per decoder, "log"
    index: int = -1  # the item's position in the list given to the decoder


class _Slot:
    """One decode worker and its buffers."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.conn = None
        self.buffers: list[Any] = []  # SharedMemory objects
        self.arrays: list[np.ndarray] = []
        self.tasks: deque = deque()  # (task_id, (index, item, sampling), buf) in the order the worker runs them
        self.free: list[int] = []
        self.ready = False
        self.since = 0.0  # when the head task started
        self.sent = 0  # tasks sent to the current process
        self.log_path: str | None = None  # where the worker captures the decoders' stderr
        self.info: dict[str, Any] = {}  # what the current process reported when ready: pid, torch imported


class _Decoder:
    """What both decoders share: ``get`` (one result, or None when done) in a blocking iterator, and
    closing as a context manager."""

    def get(self, timeout: float = 0.1) -> Decoded | Failed | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Decoded | Failed]:
        """Every result, as it comes; ends after the last item."""
        while True:
            try:
                out = self.get(timeout=1.0)
            except queue.Empty:
                continue
            if out is None:
                return
            yield out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecodePool(_Decoder):
    """Decode ``sampling``'s clips of ``items`` in ``workers`` processes; ``get()`` returns Decoded /
    Failed objects, then None.

    A video whose decode takes longer than ``timeout`` seconds has its worker killed and is
    returned as Failed(stage="timeout"); a worker that dies gives Failed(stage="crash"). Both
    workers are replaced and the other videos they had queued are decoded by others. With
    ``decoder`` "auto" such a video is first decoded once more with the other decoder
    (``video.auto_order``'s second). The workers are started by the pool's dispatcher thread: the
    constructor returns at once.
    """

    def __init__(self, items: list[video.VideoItem], sampling: Sampling, *, workers: int, timeout: float = 300.0,
                 pin_memory: bool = False, recycle_every: int = 200, prefetch: int = 2, decoder: str = "auto",
                 samplings: list[Sampling] | None = None):
        if workers < 1:
            raise BadValue(f"DecodePool needs workers >= 1, got {workers}")
        self.sampling, self.decoder = sampling, video.check_decoder(decoder)
        self.shape = sampling.shape
        self.nbytes = int(np.prod(self.shape))
        self.timeout = timeout
        self.pin_memory = pin_memory
        # Pinned buffers are allocated by the dispatcher thread: on the main thread's device, not cuda:0.
        self._cuda_device = None
        if pin_memory:
            import torch

            self._cuda_device = torch.cuda.current_device()
        self.recycle_every = max(1, recycle_every)
        self.prefetch = max(1, prefetch)
        self.results: queue.Queue = queue.Queue()
        self.max_ready = max(2, workers)  # decoded videos waiting for the model, at most
        self._todo = deque(_jobs(items, sampling, samplings))
        # item index -> (the decoder it is retried with, the first try's stage, error, log): with
        # --decoder auto, a video whose decode hung or killed its worker is decoded once more with
        # the other decoder (decord can hang holding the GIL: docs/pitfalls.md) before it fails
        self._retries: dict[int, tuple[str, str, str, str]] = {}
        self._stop = threading.Event()
        self._task_id = 0
        self._ctx = mp_context()
        if threading.current_thread() is threading.main_thread():
            warm_up_workers()  # the forkserver, spawned with the signals ignored (a no-op once it runs)
        shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        self.transport = "shm" if shm_free > 1.25 * workers * self.prefetch * self.nbytes else "pipe"
        if self.transport == "pipe":
            log.warning("/dev/shm has %.0f MiB free, too little for %d frame buffers of %.0f MiB: frames go "
                        "through pipes (slower; enlarge /dev/shm, e.g. docker --shm-size)", shm_free / 2**20,
                        workers * self.prefetch, self.nbytes / 2**20)
        self.slots = [_Slot(i) for i in range(workers)]
        try:
            for slot in self.slots:
                if self.transport == "shm":
                    from multiprocessing import shared_memory

                    slot.buffers = [shared_memory.SharedMemory(create=True, size=self.nbytes)
                                    for _ in range(self.prefetch)]
                    slot.arrays = [np.ndarray(self.shape, np.uint8, buffer=b.buf) for b in slot.buffers]
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="faster-decode-dispatch", daemon=True)
        self._thread.start()

    # -- worker management (dispatcher thread) --

    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        names = [b.name for b in slot.buffers]
        if slot.log_path is None:  # the worker's captured stderr: read from here when it is killed mid-decode
            fd, slot.log_path = tempfile.mkstemp(prefix=f"faster-decode-{slot.index}-", suffix=".log")
            os.close(fd)
        args = (child, self.sampling, self.decoder, slot.log_path, names)
        slot.proc = self._ctx.Process(target=_decode_worker, args=args, name=f"faster-decode-{slot.index}", daemon=True)
        with _main_not_reimported():
            slot.proc.start()
        child.close()
        slot.conn, slot.ready, slot.sent = parent, False, 0
        slot.free = list(range(self.prefetch))
        slot.tasks.clear()
        slot.since = time.monotonic()

    def _kill(self, slot: _Slot) -> None:
        if slot.proc is not None and slot.proc.pid is not None:
            if slot.proc.is_alive():
                slot.proc.kill()
            slot.proc.join(5)
        if slot.conn is not None:
            slot.conn.close()
        slot.proc = slot.conn = None

    def _requeue_rest(self, slot: _Slot) -> None:
        """The tasks behind the head of a dead worker go back to the front of the queue, in order."""
        rest = list(slot.tasks)[1:]
        for _, job, _ in reversed(rest):
            self._todo.appendleft(job)

    def _fail_head(self, slot: _Slot, stage: str, error: str) -> None:
        """The head task's worker hung (stage "timeout") or died ("crash"): kill and replace it, and
        fail the video, unless --decoder auto retries it with the other decoder first."""
        _, job, _ = slot.tasks[0]
        index, item, _ = job
        self._requeue_rest(slot)
        self._kill(slot)
        text = read_log(slot.log_path)
        if self.decoder == "auto" and index not in self._retries:
            other = video.auto_order(item.path)[1]  # the first one tried is the likelier to hang
            self._retries[index] = (other, stage, error, text)
            self._todo.appendleft(job)
            log.warning("%s: %s (%s); decoding it again with %s", item.id, stage, error, other)
        else:
            self.results.put(self._failed(item, index, stage, error, {"log": text} if text else {}))
        if not self._stop.is_set():
            self._start(slot)

    def _failed(self, item: video.VideoItem, index: int, stage: str, error: str, extra: dict[str, Any]) -> Failed:
        """The video's failure, with its first try's when it was retried with the other decoder."""
        retry = self._retries.get(index)
        if retry is None:
            return Failed(item, stage, error, extra, index)
        other, first_stage, first_error, first_log = retry
        first = "decord" if other == "pyav" else "pyav"
        errors = {first: f"{first_stage}: {first_error}", **extra.get("errors", {other: error})}
        log_text = "\n".join(t for t in (first_log, extra.get("log", "")) if t)
        return Failed(item, stage, f"{first}: {first_stage}: {first_error}; {other}: {error}",
                      {**extra, "errors": errors, **({"log": log_text} if log_text else {})}, index)

    def _receive(self, slot: _Slot) -> None:
        import torch

        msg = slot.conn.recv()
        if msg[0] == "ready":
            slot.ready, slot.since, slot.info = True, time.monotonic(), msg[1]
            return
        task_id, (index, item, _), buf = slot.tasks.popleft()
        assert msg[1] == task_id, f"decode worker answered task {msg[1]}, expected {task_id}"
        if msg[0] == "ok":
            meta = msg[2]
            frames = torch.empty(self.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
            if self.transport == "shm":
                frames.copy_(torch.from_numpy(slot.arrays[buf]))
            else:
                slot.conn.recv_bytes_into(memoryview(frames.numpy()).cast("B"))
            self.results.put(Decoded(item, frames, meta["num_frames"], meta["fps"], meta["clip_start"], meta["short"],
                                     meta.get("decoder", "decord"), index))
            if index in self._retries:
                log.info("%s: read with %s after the first try's %s", item.id, meta.get("decoder"),
                         self._retries[index][1])
        else:
            self.results.put(self._failed(item, index, msg[2], msg[3], msg[4]))
        slot.free.append(buf)
        slot.since = time.monotonic()

    def _dispatch_tasks(self) -> None:
        for slot in self.slots:
            while (slot.free and self._todo and slot.sent < self.recycle_every
                   and self.results.qsize() + self._in_flight() < self.max_ready + len(self.slots) * self.prefetch
                   and self.results.qsize() < self.max_ready):
                job = self._todo.popleft()
                _, item, own = job
                buf = slot.free.pop()
                self._task_id += 1
                if not slot.tasks:
                    slot.since = time.monotonic()
                slot.tasks.append((self._task_id, job, buf))
                slot.sent += 1
                try:
                    retry = self._retries.get(job[0])
                    slot.conn.send(("task", self._task_id, str(item.path), buf, item.id, own, retry and retry[0]))
                except OSError:  # the worker died: the wait below sees its sentinel and handles it
                    break
            if slot.sent >= self.recycle_every and not slot.tasks and self._todo:
                slot.conn.send(("stop",))
                slot.proc.join(10)
                self._kill(slot)
                self._start(slot)

    def _in_flight(self) -> int:
        return sum(len(s.tasks) for s in self.slots)

    def _serve(self) -> None:
        """The dispatcher thread: hands videos to the workers, collects their results, kills and
        replaces a worker that hangs past ``timeout`` or dies."""
        from multiprocessing.connection import wait

        try:
            if self._cuda_device is not None:
                import torch

                torch.cuda.set_device(self._cuda_device)
            for slot in self.slots:  # here, not in __init__: starting a worker waits for the forkserver's
                if not self._stop.is_set():  # imports, which the caller (building its models meanwhile) need not
                    self._start(slot)
            while not self._stop.is_set():
                self._dispatch_tasks()
                if not self._todo and not self._in_flight():
                    break
                now = time.monotonic()
                waits = [now + 0.05]
                for s in self.slots:
                    if s.tasks and s.ready:
                        waits.append(s.since + self.timeout)
                objs = {}
                for s in self.slots:
                    objs[s.conn] = s
                    objs[s.proc.sentinel] = s
                ready = wait(list(objs), timeout=max(0.0, min(waits) - now))
                for s in {id(objs[r]): objs[r] for r in ready}.values():
                    if s.conn is None:
                        continue
                    if s.conn.poll():
                        try:
                            self._receive(s)
                            continue
                        except (EOFError, OSError, ConnectionError):
                            pass
                    if s.proc.is_alive():
                        continue
                    code = s.proc.exitcode
                    if not s.ready:
                        raise RuntimeError(f"a decode worker died while starting (exit code {code}); its error "
                                           f"is printed above")
                    if s.tasks:
                        self._fail_head(s, "crash", f"decoder process died (exit code {code})")
                    else:
                        self._kill(s)
                        self._start(s)
                now = time.monotonic()
                for s in self.slots:
                    if s.tasks and s.ready and now - s.since > self.timeout:
                        log.warning("%s: no frames after %.0f s; killing its decoder", s.tasks[0][1][1].id, self.timeout)
                        self._fail_head(s, "timeout", f"decoding took longer than {self.timeout:g} s; worker killed")
                    elif not s.ready and now - s.since > max(120.0, self.timeout):
                        raise RuntimeError(f"a decode worker did not start within {max(120.0, self.timeout):.0f} s")
        except BaseException as err:  # surfaces in the main thread through get()
            self.results.put(err)
            return
        self.results.put(None)

    # -- main thread --

    def get(self, timeout: float = 0.1) -> Decoded | Failed | None:
        """The next decoded or failed video; None once every item was returned. Raises queue.Empty on timeout."""
        out = self.results.get(timeout=timeout)
        if isinstance(out, BaseException):
            raise RuntimeError(f"decoding failed: {out}") from out
        return out

    def close(self) -> None:
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(10)
        for slot in self.slots:
            try:
                if slot.conn is not None:
                    try:
                        slot.conn.send(("stop",))
                    except (OSError, ValueError):
                        pass
                if slot.proc is not None and slot.proc.pid is not None:
                    slot.proc.join(0.5)
                self._kill(slot)
            finally:
                slot.arrays = []
                for b in slot.buffers:
                    b.close()
                    b.unlink()
                slot.buffers = []
                if slot.log_path is not None:
                    Path(slot.log_path).unlink(missing_ok=True)
                    slot.log_path = None



class InlineDecoder(_Decoder):
    """``workers=0``: decode in the main process, one video per ``get`` (no overlap, no timeout).

    The decoders' stderr is captured around each decode as in a worker (the main thread waits
    for the decode meanwhile, so little else is writing).
    """

    def __init__(self, items: list[video.VideoItem], sampling: Sampling, *, decoder: str = "auto",
                 samplings: list[Sampling] | None = None):
        self.sampling, self.decoder = sampling, video.check_decoder(decoder)
        self._todo = deque(_jobs(items, sampling, samplings))
        self._sink = None

    def get(self, timeout: float = 0.1) -> Decoded | Failed | None:
        import torch

        if not self._todo:
            return None
        index, item, own = self._todo.popleft()
        if self._sink is None:
            self._sink = tempfile.TemporaryFile()
        r = _decode_one(item.path, own or self.sampling, self.decoder, self._sink, item.id)
        if r[0] == "err":
            return Failed(item, r[1], r[2], r[3], index)
        d = r[1]
        return Decoded(item, torch.from_numpy(d.frames), d.num_frames, d.fps, d.clip_start, d.short, d.decoder, index)

    def close(self) -> None:
        self._todo.clear()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
