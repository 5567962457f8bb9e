"""Decoding videos in worker processes for extraction and predict (README "faster extract").

``DecodePool`` decodes each video in one of ``workers`` processes so that decoding overlaps the
model and a decoder that hangs (decord can, holding the GIL, PITFALLS) or dies is killed after
``timeout`` s, reported as Failed(stage="timeout" / "crash"), and replaced; the other videos it
had queued go to other workers. Each worker owns ``prefetch`` frame buffers in shared memory
(pipes when /dev/shm is too small): it decodes the next video while the main process copies out
the last. Workers are recycled every ``recycle_every`` videos (decord leaks a little).
``InlineDecoder`` (``workers=0``) decodes in the calling process, without overlap or timeout.

Both iterate over Decoded / Failed results (``for r in decoder``) and close as context managers.
``decode`` is the function that decodes one video (default ``faster.extract.video.decode_clips``);
it must be importable by name in the worker processes (a module-level function, or a
functools.partial of one).
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from faster.errors import BadValue
from faster.extract import video as vid

log = logging.getLogger(__name__)

DecodeFn = Callable[..., "vid.DecodedVideo"]


def _decode_worker(conn, spec: dict[str, Any], buffer_names: list[str], decode: DecodeFn | None) -> None:
    """A decode process: receives (task_id, path, buffer, id), decodes into the shared buffer, replies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops us
    import torch

    torch.set_num_threads(1)
    from multiprocessing import shared_memory

    shape = tuple(spec["shape"])
    shms = [shared_memory.SharedMemory(name=n) for n in buffer_names]
    arrays = [np.ndarray(shape, dtype=np.uint8, buffer=s.buf) for s in shms]
    decode = decode or vid.decode_clips
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                break
            _, task_id, path, buf, video_id = msg
            try:
                out = arrays[buf] if arrays else None
                d = decode(path, num_clips=spec.get("num_clips") or shape[0], clip_len=shape[1],
                                     size=shape[2], frame_stride=spec["frame_stride"], out=out,
                                     positions=spec.get("positions"))
                conn.send(("ok", task_id, {"num_frames": d.num_frames, "fps": d.fps, "clip_start": d.clip_start,
                                           "short": d.short}))
                if not arrays:  # pipe transport: the frames follow as raw bytes
                    conn.send_bytes(memoryview(d.frames).cast("B"))
            except vid.DecodeError as err:
                conn.send(("err", task_id, err.stage, str(err)))
            except Exception as err:  # any other decoder error is this video's, not the run's
                conn.send(("err", task_id, "decode", vid._short_error(err)))
    finally:
        del arrays
        for s in shms:
            s.close()


def mp_context():
    """The start method of decode workers: a forkserver that has imported torch and decord once (a clean
    process, never a fork of one holding CUDA or OpenMP state), spawn where there is no forkserver."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "torch", "decord", "faster.extract.decoders"])
    return ctx


def warm_up_workers() -> None:
    """Start the forkserver now so its imports overlap the main process's model building."""
    ctx = mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with _main_not_reimported():
            forkserver.ensure_running()


@contextmanager
def _main_not_reimported():
    """Start a forkserver/spawn child without re-running ``__main__`` in it, and with SIGINT ignored.

    The decode worker lives in this module and needs nothing from the caller's script, so scripts
    without the ``if __name__ == "__main__"`` guard, stdin and notebooks work too. A child started
    while SIGINT is ignored keeps ignoring it (Python installs its KeyboardInterrupt handler only
    where the parent did not ignore the signal): a Ctrl-C while the forkserver is still importing
    torch no longer prints its traceback; the main process alone handles it and stops the children.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)
        if in_main_thread:
            signal.signal(signal.SIGINT, old_sigint)


@dataclass
class Decoded:
    """A decoded video handed to the model loop: ``frames`` is a (N, L, S, S, 3) uint8 tensor."""

    item: vid.VideoItem
    frames: Any
    num_frames: int
    fps: float
    clip_start: list[int]
    short: bool


@dataclass
class Failed:
    item: vid.VideoItem
    stage: str
    error: str


class _Slot:
    """One decode worker and its buffers."""

    def __init__(self, index: int):
        self.index = index
        self.proc = None
        self.conn = None
        self.buffers: list[Any] = []  # SharedMemory objects
        self.arrays: list[np.ndarray] = []
        self.tasks: deque = deque()  # (task_id, item, buf) in the order the worker runs them
        self.free: list[int] = []
        self.ready = False
        self.since = 0.0  # when the head task started
        self.sent = 0  # tasks sent to the current process


class _Decoder:
    """What both decoders share: ``get`` (one result, or None when done) in a blocking iterator, and
    closing as a context manager."""

    def get(self, timeout: float = 0.1) -> "Decoded | Failed | None":
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator["Decoded | Failed"]:
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
    """Decode ``items`` in ``workers`` processes; ``get()`` returns Decoded / Failed objects, then None.

    A video whose decode takes longer than ``timeout`` seconds has its worker killed and is
    returned as Failed(stage="timeout"); a worker that dies gives Failed(stage="crash"). Both
    workers are replaced and the other videos they had queued are decoded by others.
    """

    def __init__(self, items: list[vid.VideoItem], *, workers: int, num_clips: int, clip_len: int, size: int,
                 frame_stride: int = 1, timeout: float = 300.0, pin_memory: bool = False,
                 decode: DecodeFn | None = None, recycle_every: int = 200, prefetch: int = 2,
                 positions: list[int] | None = None):
        if workers < 1:
            raise BadValue(f"DecodePool needs workers >= 1, got {workers}")
        # positions: only those of the num_clips clips are decoded (predict on a fitted run's subset)
        positions = vid.check_positions(positions, num_clips)
        self.shape = (num_clips if positions is None else len(positions), clip_len, size, size, 3)
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
        self.decode = decode
        self.spec = {"shape": self.shape, "frame_stride": frame_stride, "num_clips": num_clips,
                     "positions": None if positions is None else [int(p) for p in positions]}
        self.results: queue.Queue = queue.Queue()
        self.max_ready = max(2, workers)  # decoded videos waiting for the model, at most
        self._todo = deque(items)
        self._stop = threading.Event()
        self._task_id = 0
        self._ctx = mp_context()
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
                self._start(slot)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._run, name="faster-decode-dispatch", daemon=True)
        self._thread.start()

    # -- worker management (dispatcher thread) --

    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        names = [b.name for b in slot.buffers]
        slot.proc = self._ctx.Process(target=_decode_worker, args=(child, self.spec, names, self.decode),
                                      name=f"faster-decode-{slot.index}", daemon=True)
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
        for _, item, _ in reversed(rest):
            self._todo.appendleft(item)

    def _fail_head(self, slot: _Slot, stage: str, error: str) -> None:
        _, item, _ = slot.tasks[0]
        self._requeue_rest(slot)
        self._kill(slot)
        self.results.put(Failed(item, stage, error))
        if not self._stop.is_set():
            self._start(slot)

    def _receive(self, slot: _Slot) -> None:
        import torch

        msg = slot.conn.recv()
        if msg[0] == "ready":
            slot.ready, slot.since = True, time.monotonic()
            return
        task_id, item, buf = slot.tasks.popleft()
        assert msg[1] == task_id, f"decode worker answered task {msg[1]}, expected {task_id}"
        if msg[0] == "ok":
            meta = msg[2]
            frames = torch.empty(self.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
            if self.transport == "shm":
                frames.copy_(torch.from_numpy(slot.arrays[buf]))
            else:
                slot.conn.recv_bytes_into(memoryview(frames.numpy()).cast("B"))
            self.results.put(Decoded(item, frames, meta["num_frames"], meta["fps"], meta["clip_start"], meta["short"]))
        else:
            self.results.put(Failed(item, msg[2], msg[3]))
        slot.free.append(buf)
        slot.since = time.monotonic()

    def _dispatch_tasks(self) -> None:
        for slot in self.slots:
            while (slot.free and self._todo and slot.sent < self.recycle_every
                   and self.results.qsize() + self._in_flight() < self.max_ready + len(self.slots) * self.prefetch
                   and self.results.qsize() < self.max_ready):
                item = self._todo.popleft()
                buf = slot.free.pop()
                self._task_id += 1
                if not slot.tasks:
                    slot.since = time.monotonic()
                slot.tasks.append((self._task_id, item, buf))
                slot.sent += 1
                try:
                    slot.conn.send(("task", self._task_id, str(item.path), buf, item.id))
                except OSError:  # the worker died: the wait below sees its sentinel and handles it
                    break
            if slot.sent >= self.recycle_every and not slot.tasks and self._todo:
                slot.conn.send(("stop",))
                slot.proc.join(10)
                self._kill(slot)
                self._start(slot)

    def _in_flight(self) -> int:
        return sum(len(s.tasks) for s in self.slots)

    def _run(self) -> None:
        from multiprocessing.connection import wait

        try:
            if self._cuda_device is not None:
                import torch

                torch.cuda.set_device(self._cuda_device)
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
                        log.warning("%s: no frames after %.0f s; killing its decoder", s.tasks[0][1].id, self.timeout)
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



class InlineDecoder(_Decoder):
    """``workers=0``: decode in the main process, one video per ``get`` (no overlap, no timeout)."""

    def __init__(self, items: list[vid.VideoItem], *, num_clips: int, clip_len: int, size: int,
                 frame_stride: int = 1, decode: DecodeFn | None = None, positions: list[int] | None = None,
                 **_: Any):
        self._todo = deque(items)
        self.kw = {"num_clips": num_clips, "clip_len": clip_len, "size": size, "frame_stride": frame_stride,
                   "positions": positions}
        self.decode = decode or vid.decode_clips

    def get(self, timeout: float = 0.1) -> Decoded | Failed | None:
        import torch

        if not self._todo:
            return None
        item = self._todo.popleft()
        try:
            d = self.decode(item.path, **self.kw)
        except vid.DecodeError as err:
            return Failed(item, err.stage, str(err))
        except Exception as err:
            return Failed(item, "decode", vid._short_error(err))
        return Decoded(item, torch.from_numpy(d.frames), d.num_frames, d.fps, d.clip_start, d.short)

    def close(self) -> None:
        self._todo.clear()
