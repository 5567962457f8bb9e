"""`faster extract`: decode each video once, run every backbone over its clips, write HDF5 shards.

The paper's first stage (Sec. "Experimental Setups"): N clips of L frames uniformly covering each
video (N x L = 256 by default), each passed through the clip-level backbones whose res5 maps the
aggregators of the second stage consume (Eq. 1-6). Here the maps are computed once and cached
(DESIGN.md "Shard schema") so any expensive:cheap pattern can be composed later.

Structure of one process:

  decode workers (processes) --uint8 frames, shared memory--> dispatcher thread --> model loop --> ShardWriter
        one video each, killed on timeout          copies out (pinned on CUDA)     batches of clips

* Decoding runs in ``workers`` processes so it overlaps the model and so a decoder that hangs
  (decord can, holding the GIL) or dies is killed after ``timeout`` s, recorded as failed, and
  replaced. Each worker owns two frame buffers: it decodes the next video while the main process
  copies out the last one.
* The model loop batches clips across videos; every model sees every clip of one decode. On CUDA:
  bf16 autocast, channels_last_3d, cudnn.benchmark with fixed batch shapes (the last batch is
  padded), pinned memory and non-blocking copies; on out-of-memory the batch is halved.
* Shards are written under a temporary name and renamed when complete; resume skips videos held by
  any complete shard of the directory; a different configuration is refused; SIGINT/SIGTERM close
  the shard being written and stop; SIGKILL loses at most that shard.
* Scale-out: part = shard_index * WORLD_SIZE + RANK of num_shards * WORLD_SIZE parts; each part
  takes every num_parts-th video (sorted by id) and writes only files named with its part.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from faster.extract import video as vid
from faster.store import manifest as mf
from faster.store import schema
from faster.store.writer import next_seq

log = logging.getLogger(__name__)

FRAMES_PER_VIDEO = 256  # the paper's N x L


@dataclass
class ExtractConfig:
    """One extraction. Fields that define the features (clip_len, num_clips, size, frame_stride,
    models and their weights) must match those of the shards already in ``out``."""

    video_root: str  # directory of videos; ids are paths relative to it
    out: str  # the feature-set directory
    models: tuple[str, ...]  # backbone names (faster.extract.models.names())
    weights: dict[str, str] = field(default_factory=dict)  # model name -> weights file; random init without
    clip_len: int = 8  # L, frames per clip
    num_clips: int | None = None  # N, clips per video; None -> 256 // clip_len
    size: int = 224  # crop size in pixels (short side resized to size * 8/7 first)
    frame_stride: int = 1  # frame step inside a clip
    batch_size: int = 8  # clips per forward pass (halved on CUDA out-of-memory)
    workers: int = 2  # decoding processes; 0 decodes in the main process (no timeout)
    device: str = "auto"  # auto, cpu, cuda or cuda:N (auto: cuda:LOCAL_RANK when CUDA is available)
    annotations: str | None = None  # CSV: path,label or Kinetics' label,youtube_id,time_start,time_end,split
    classes_file: str | None = None  # one class per line: fixes the class indices
    unlabelled: bool = False  # ignore folder names: every label -1
    shard_size: int = 64  # videos per shard
    num_shards: int = 1  # Slurm array size
    shard_index: int = 0  # Slurm array index
    compression: str = "none"  # none, lzf or gzip
    timeout: float = 300.0  # seconds a video may take to decode before its worker is killed
    seed: int = 0  # seed of random initialisation of backbones without weights
    progress: bool = True  # tqdm progress bar
    recycle_every: int = 200  # videos per decode worker before it is replaced (decord leaks a little)
    debug_decode_fault: str | None = None  # tests: "SUBSTRING:sleep=S" or "SUBSTRING:exit" in the decoder
    debug_kill_after_shards: int | None = None  # tests: SIGKILL self inside shard k+1, after k complete

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("no --model given")
        dup = sorted({m for m in self.models if self.models.count(m) > 1})
        if dup:
            raise ValueError(f"--model {dup[0]!r} given twice")
        unknown = sorted(set(self.weights) - set(self.models))
        if unknown:
            raise ValueError(f"--weights for {unknown[0]!r}, which is not a --model ({', '.join(self.models)})")
        if self.num_clips is None:
            self.num_clips = max(1, FRAMES_PER_VIDEO // self.clip_len)
        for name in ("clip_len", "num_clips", "size", "frame_stride", "batch_size", "shard_size", "num_shards"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} is not in [0, num_shards={self.num_shards})")
        if self.compression not in schema.COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}; expected one of {schema.COMPRESSIONS}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.debug_decode_fault is not None:
            _parse_fault(self.debug_decode_fault)


# ----------------------------------------------------------------------------------------------
# Placement: which process writes which part

@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    part: int  # shard_index * world_size + rank
    num_parts: int  # num_shards * world_size


def placement(num_shards: int = 1, shard_index: int = 0, env: dict[str, str] | None = None) -> Placement:
    """This process's part from torchrun's RANK/WORLD_SIZE/LOCAL_RANK and the Slurm-array options."""
    env = os.environ if env is None else env

    def geti(name: str, default: int) -> int:
        value = env.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    world, rank = geti("WORLD_SIZE", 1), geti("RANK", 0)
    local_rank, local_world = geti("LOCAL_RANK", rank), geti("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
    return Placement(rank, world, local_rank, max(local_world, 1), shard_index * world + rank, num_shards * world)


def resolve_device(device: str, local_rank: int = 0) -> str:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")
    return device


def cpu_threads(workers: int, local_world_size: int = 1, env: dict[str, str] | None = None) -> int:
    """Intra-op threads for a CPU model: OMP_NUM_THREADS when set (torchrun sets 1), else this process's
    share of the cores less one core left to the decode workers (when there are any).

    OpenMP barriers stall whenever another process takes a core from one of their threads: on the
    2-core box of BENCHMARKS.md r2d26 ran 3x faster with 1 thread than with 2 next to busy decoders.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(local_world_size, 1))
    return max(1, share - 1) if workers > 0 else share


# ----------------------------------------------------------------------------------------------
# Decoding in worker processes

def _parse_fault(spec: str) -> tuple[str, str, float]:
    sub, sep, action = spec.rpartition(":")
    if sep and action == "exit":
        return sub, "exit", 0.0
    if sep and action.startswith("sleep="):
        try:
            return sub, "sleep", float(action[len("sleep="):])
        except ValueError:
            pass
    raise ValueError(f"debug decode fault {spec!r}: expected SUBSTRING:sleep=SECONDS or SUBSTRING:exit")


def _apply_fault(fault: tuple[str, str, float] | None, video_id: str) -> None:
    if fault and fault[0] in video_id:
        if fault[1] == "exit":
            os._exit(3)
        time.sleep(fault[2])


def _decode_worker(conn, spec: dict[str, Any], buffer_names: list[str]) -> None:
    """A decode process: receives (task_id, path, buffer, id), decodes into the shared buffer, replies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops us
    import torch

    torch.set_num_threads(1)
    from multiprocessing import shared_memory

    shape = tuple(spec["shape"])
    shms = [shared_memory.SharedMemory(name=n) for n in buffer_names]
    arrays = [np.ndarray(shape, dtype=np.uint8, buffer=s.buf) for s in shms]
    fault = _parse_fault(spec["fault"]) if spec.get("fault") else None
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
                _apply_fault(fault, video_id)
                out = arrays[buf] if arrays else None
                d = vid.decode_clips(path, num_clips=spec.get("num_clips") or shape[0], clip_len=shape[1],
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
    ctx.set_forkserver_preload(["numpy", "torch", "decord", "faster.extract.pipeline"])
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
    """Start a forkserver/spawn child without re-running ``__main__`` in it.

    The decode worker lives in this module and needs nothing from the caller's script, so scripts
    without the ``if __name__ == "__main__"`` guard, stdin and notebooks work too.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


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
                 fault: str | None = None, recycle_every: int = 200, prefetch: int = 2,
                 positions: list[int] | None = None):
        if workers < 1:
            raise ValueError(f"DecodePool needs workers >= 1, got {workers}")
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
        self.spec = {"shape": self.shape, "frame_stride": frame_stride, "fault": fault, "num_clips": num_clips,
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
        slot.proc = self._ctx.Process(target=_decode_worker, args=(child, self.spec, names),
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
                 frame_stride: int = 1, fault: str | None = None, positions: list[int] | None = None, **_: Any):
        self._todo = deque(items)
        self.kw = {"num_clips": num_clips, "clip_len": clip_len, "size": size, "frame_stride": frame_stride,
                   "positions": positions}
        self.fault = _parse_fault(fault) if fault else None

    def get(self, timeout: float = 0.1) -> Decoded | Failed | None:
        import torch

        if not self._todo:
            return None
        item = self._todo.popleft()
        try:
            _apply_fault(self.fault, item.id)
            d = vid.decode_clips(item.path, **self.kw)
        except vid.DecodeError as err:
            return Failed(item, err.stage, str(err))
        except Exception as err:
            return Failed(item, "decode", vid._short_error(err))
        return Decoded(item, torch.from_numpy(d.frames), d.num_frames, d.fps, d.clip_start, d.short)

    def close(self) -> None:
        self._todo.clear()



# ----------------------------------------------------------------------------------------------
# Models

class ClipModels:
    """Every backbone over batches of uint8 clips: normalised on the device, bf16 autocast on CUDA."""

    def __init__(self, cfg: ExtractConfig, device: str):
        import torch

        from faster.extract import models as registry

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and torch.cuda.is_bf16_supported():
            self.amp_dtype, self.compute_dtype = torch.bfloat16, "bfloat16"
        else:
            self.amp_dtype, self.compute_dtype = None, "float32"
        self.batch_size = cfg.batch_size
        self.models = {}
        self.attrs: dict[str, dict[str, Any]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in cfg.models:
            model = registry.build(name, weights=cfg.weights.get(name), seed=cfg.seed)
            if cfg.weights.get(name) is None:
                log.warning("%s is randomly initialised (seed %d): its features carry no learned information; "
                            "pass --weights %s=PATH for real features", name, cfg.seed, name)
            model = model.to(self.device).eval()
            if self.cuda:
                model = model.to(memory_format=torch.channels_last_3d)
            self.models[name] = model
            C, T, H, W = registry.feature_shape(name, cfg.clip_len, cfg.size)
            self.shapes[name] = (T, H, W, C)  # per clip, channels last
            self.attrs[name] = {
                "gflops_per_clip": float(registry.clip_gflops(name, cfg.clip_len, cfg.size)),
                "layer": str(model.layer), "weights": str(model.weights),
                "mean": [float(v) for v in model.mean], "std": [float(v) for v in model.std],
                "compute_dtype": self.compute_dtype,
            }

    def bytes_per_video(self, num_clips: int) -> int:
        return sum(num_clips * int(np.prod(s)) * 2 for s in self.shapes.values())  # float16

    def _forward(self, clips) -> dict[str, Any]:
        """(b, L, S, S, 3) uint8 on the device -> per model (b, T', H', W', C) float16 on the CPU."""
        import torch

        b = clips.shape[0]
        if self.cuda and b < self.batch_size:  # fixed shapes: cudnn.benchmark tunes once
            pad = clips.new_zeros((self.batch_size - b, *clips.shape[1:]))
            clips = torch.cat([clips, pad])
        out = {}
        with torch.inference_mode():
            for name, model in self.models.items():
                x = vid.normalise_clips(clips, model.mean, model.std)  # (B, 3, L, S, S) float32
                if self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    y = model(x)  # (B, C, T', H', W')
                y = y[:b].permute(0, 2, 3, 4, 1).to(torch.float16)  # (b, T', H', W', C)
                out[name] = y.to("cpu", non_blocking=False)
        return out

    def __call__(self, clips) -> dict[str, Any]:
        """Forward ``clips`` in pieces of ``batch_size``; on CUDA out-of-memory halve it and go on."""
        import torch

        pieces: list[dict[str, Any]] = []
        start = 0
        while start < clips.shape[0]:
            piece = clips[start:start + self.batch_size]
            try:
                pieces.append(self._forward(piece))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise RuntimeError("CUDA out of memory with a batch of one clip: use a smaller --size, "
                                       "fewer --model, or a larger GPU") from None
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: batch size halved to %d clips", self.batch_size)
                continue
            start += piece.shape[0]
        return {name: torch.cat([p[name] for p in pieces]) for name in self.models}


@dataclass
class _Pending:
    """A decoded video whose clips are going through the models."""

    decoded: Decoded
    frames: Any  # on the device
    done: int = 0
    outputs: dict[str, list] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Output directory: existing shards, configuration, disk space

def config_dict(cfg: ExtractConfig, classes: list[str], model_attrs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a feature-set directory must never mix (schema.CONFIG_ATTRS plus the models' provenance)."""
    return {"clip_len": cfg.clip_len, "num_clips": cfg.num_clips, "frame_stride": cfg.frame_stride, "size": cfg.size,
            "classes": list(classes),
            "models": {m: {k: a[k] for k in ("layer", "weights", "mean", "std", "compute_dtype")}
                       for m, a in model_attrs.items()}}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_existing(out: Path, config: dict[str, Any], part: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Ids of every complete shard in ``out`` (refusing another configuration) and checksums this part listed."""
    from faster.store.verify import config_diff, shard_info

    shard_videos: dict[str, list[str]] = {}
    for path in sorted(out.glob(schema.SHARD_GLOB)):
        if schema.parse_shard_name(path.name) is None:
            continue
        info = shard_info(path)
        diff = config_diff(info["config"], config)
        if diff:
            raise ValueError(f"{out} holds features of another configuration ({path.name}: {'; '.join(diff[:4])}); "
                             f"use a new output directory, or the options that made it")
        shard_videos[path.name] = info["ids"]
    for p, m in mf.part_manifests(out).items():
        if m and m.get("config"):
            diff = config_diff(m["config"], config)
            if diff:
                raise ValueError(f"{out} was started with another configuration ({schema.manifest_name(p)}: "
                                 f"{'; '.join(diff[:4])}); use a new output directory, or the options that made it")
    mine = mf.read_json(out / schema.manifest_name(part)) or {}
    checksums = {s["name"]: s["sha256"] for s in mine.get("shards", []) if s["name"] in shard_videos}
    return shard_videos, checksums


def _clean_stale_tmp(out: Path, part: int) -> None:
    """Temporary shards of this part left by a killed run: they are incomplete by construction."""
    for p in out.glob(".shard-*.h5.tmp"):
        parsed = schema.parse_shard_name(p.name[1:-4])
        if parsed and parsed[0] == part:
            log.info("removing %s, left by an interrupted run", p.name)
            p.unlink(missing_ok=True)


class _StopFlag:
    """SIGINT/SIGTERM set the flag (the run closes its shard and stops); a second signal acts as usual."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        log.warning("%s received: closing the current shard and stopping (again to abort)", self.signal)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# The run

def run_extract(cfg: ExtractConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extract the features of ``cfg.video_root`` into ``cfg.out``; return the run's summary.

    ``echo`` receives the user-facing lines (the plan with its size estimate); logging otherwise.
    Raises ValueError for a bad configuration, a configuration that differs from the shards in
    ``out``, or a disk without room for the estimated output.
    """
    import torch

    import faster

    say = echo or log.info
    t0 = time.monotonic()
    place = placement(cfg.num_shards, cfg.shard_index)
    device = resolve_device(cfg.device, place.local_rank)
    if cfg.workers > 0:
        warm_up_workers()
    found = vid.discover(cfg.video_root, cfg.annotations, cfg.classes_file, cfg.unlabelled)
    for note in found.notes:
        log.warning("%s", note)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    old_threads = torch.get_num_threads()
    old_benchmark = torch.backends.cudnn.benchmark
    if device == "cpu":
        torch.set_num_threads(cpu_threads(cfg.workers, place.local_world_size))
    else:
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True
    try:
        models = ClipModels(cfg, device)
        config = config_dict(cfg, found.classes, models.attrs)
        shard_videos, checksums = _check_existing(out, config, place.part)
        done = {i for ids in shard_videos.values() for i in ids}
        mine = found.items[place.part::place.num_parts]
        todo = [it for it in mine if it.id not in done]
        missing = [it for it in todo if it.path is None]
        todo = [it for it in todo if it.path is not None]
        per_video = models.bytes_per_video(cfg.num_clips)
        need = per_video * len(todo)
        free = shutil.disk_usage(out).free
        say(f"{len(todo)} videos to extract ({len(mine) - len(todo) - len(missing)} done already, {len(missing)} "
            f"missing) of {len(found.items)} [{found.layout}, {len(found.classes)} classes]"
            + (f", part {place.part} of {place.num_parts}" if place.num_parts > 1 else "")
            + f"; {device}; about {_fmt_bytes(need)} of features ({_fmt_bytes(per_video)}/video), "
              f"{_fmt_bytes(free)} free")
        if need > 0 and need * 1.02 + 64 * 2**20 > free:
            raise ValueError(f"not enough disk space in {out}: the features need about {_fmt_bytes(need)} "
                             f"({len(todo)} videos x {_fmt_bytes(per_video)}), {_fmt_bytes(free)} are free; free "
                             f"space or choose fewer --num-clips, a smaller --size or --compression lzf")
        first_seq = next_seq(out, place.part)  # before cleaning: a killed run's temporary name is not reused
        _clean_stale_tmp(out, place.part)
        attrs = {"clip_len": cfg.clip_len, "num_clips": cfg.num_clips, "frame_stride": cfg.frame_stride,
                 "size": cfg.size, "classes": list(found.classes), "software_version": faster.__version__,
                 "torch_version": torch.__version__}
        run = _Run(cfg, place, out, models, attrs, config, shard_videos, checksums, first_seq)
        summary = run.execute(todo, missing, skipped=len(mine) - len(todo) - len(missing))
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_benchmark
    summary.update(device=device, layout=found.layout, seconds=round(time.monotonic() - t0, 3))
    return summary


class _Run:
    """The state of one process's extraction: its shards, manifest, failures and counters."""

    def __init__(self, cfg: ExtractConfig, place: Placement, out: Path, models: ClipModels, attrs: dict[str, Any],
                 config: dict[str, Any], shard_videos: dict[str, list[str]], checksums: dict[str, str],
                 first_seq: int):
        self.cfg, self.place, self.out, self.models = cfg, place, out, models
        self.seq = first_seq  # the next shard's sequence number
        self.attrs, self.config = attrs, config
        self.shard_videos = shard_videos  # every complete shard of the directory -> its ids
        self.failures = mf.FailureLog(out, place.part)
        self.writer = None
        self.shards_this_run = 0
        self.extracted = self.clips = self.failed = 0
        self.short: list[str] = []
        old = mf.read_json(out / schema.manifest_name(place.part)) or {}
        self.short_all = set(old.get("short", []))
        self.runs = list(old.get("runs", []))
        self.my_shards = {}
        for name in sorted(shard_videos):
            parsed = schema.parse_shard_name(name)
            if parsed and parsed[0] == place.part:
                self.my_shards[name] = mf.shard_entry(out / name, len(shard_videos[name]), checksums.get(name))

    # -- shards and manifests --

    def _add(self, p: _Pending) -> None:
        from faster.store.writer import ShardWriter

        d = p.decoded
        if self.writer is None:
            self.seq = max(self.seq, next_seq(self.out, self.place.part))
            self.writer = ShardWriter(self.out, part=self.place.part, seq=self.seq,
                                      attrs=self.attrs, model_attrs=self.models.attrs, capacity=self.cfg.shard_size,
                                      compression=self.cfg.compression).__enter__()
        feats = {m: np.concatenate(chunks) for m, chunks in p.outputs.items()}  # (N, T', H', W', C)
        self.writer.add(id=d.item.id, label=d.item.label, num_frames=d.num_frames, fps=d.fps,
                        clip_start=d.clip_start, features=feats, split=d.item.split)
        self.extracted += 1
        self.clips += self.cfg.num_clips
        if d.short:
            self.short.append(d.item.id)
            self.short_all.add(d.item.id)
        k = self.cfg.debug_kill_after_shards
        if k is not None and self.shards_this_run >= k:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: a crash in the middle of a shard
        if self.writer.full:
            self._close_shard()

    def _close_shard(self) -> None:
        w, self.writer = self.writer, None
        if w is None:
            return
        w.__exit__(None, None, None)
        self.seq += 1
        self.shard_videos[w.path.name] = list(w.ids)
        self.my_shards[w.path.name] = mf.shard_entry(w.path, len(w.ids), w.sha256)
        self.shards_this_run += 1
        self._write_manifest()

    def _abort_shard(self, exc: BaseException) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            w.__exit__(type(exc), exc, exc.__traceback__)

    def _write_manifest(self, finished: dict[str, Any] | None = None) -> None:
        import faster
        import torch

        m = {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "part": self.place.part,
             "num_parts": self.place.num_parts, "config": self.config, "software_version": faster.__version__,
             "torch_version": torch.__version__, "shards": [self.my_shards[k] for k in sorted(self.my_shards)],
             "videos": sum(s["videos"] for s in self.my_shards.values()), "short": sorted(self.short_all),
             "runs": self.runs + ([finished] if finished else [])}
        mf.write_part_manifest(self.out, self.place.part, m)

    def _fail(self, item: vid.VideoItem, stage: str, error: str) -> None:
        log.warning("%s: %s failed: %s", item.id, stage, error)
        self.failures.append(mf.failure_record(item.id, stage, error))
        self.failed += 1

    # -- the loop --

    def execute(self, todo: list[vid.VideoItem], missing: list[vid.VideoItem], skipped: int) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        t0 = time.monotonic()
        done_before = {i for ids in self.shard_videos.values() for i in ids}
        self.failures.compact(done_before)
        for item in missing:
            self._fail(item, "missing", item.error or "not found")
        self._write_manifest()
        decoder_cls = DecodePool if cfg.workers > 0 and todo else InlineDecoder  # nothing to do: no processes
        bar = tqdm(total=len(todo), unit="video", disable=not cfg.progress or not todo, dynamic_ncols=True,
                   desc="extract" if self.place.num_parts == 1 else f"extract part {self.place.part}")
        pending: deque[_Pending] = deque()
        exhausted = not todo
        interrupted = None
        try:
            with _StopFlag() as stop, decoder_cls(
                    todo, workers=cfg.workers, num_clips=cfg.num_clips, clip_len=cfg.clip_len, size=cfg.size,
                    frame_stride=cfg.frame_stride, timeout=cfg.timeout, pin_memory=self.models.cuda,
                    fault=cfg.debug_decode_fault, recycle_every=cfg.recycle_every) as decoder:
                while True:
                    # Fill: decoded videos until a batch of clips is waiting (the workers decode meanwhile).
                    while not exhausted and stop.signal is None and \
                            sum(cfg.num_clips - p.done for p in pending) < self.models.batch_size:
                        try:
                            r = decoder.get(timeout=0.1)
                        except queue.Empty:
                            continue
                        if r is None:
                            exhausted = True
                        elif isinstance(r, Failed):
                            self._fail(r.item, r.stage, r.error)
                            bar.update(1)
                        else:
                            frames = r.frames.to(self.models.device, non_blocking=True)
                            pending.append(_Pending(r, frames, outputs={m: [] for m in self.models.models}))
                    if stop.signal is not None:
                        interrupted = stop.signal
                        break
                    if not pending:
                        break
                    self._step(pending, bar, t0)
        except BaseException as exc:
            self._abort_shard(exc)
            bar.close()
            raise
        self._close_shard()
        bar.close()
        seconds = time.monotonic() - t0
        done_now = {i for ids in self.shard_videos.values() for i in ids}
        self.failures.compact(done_now)
        finished = {"started": started, "seconds": round(seconds, 3), "extracted": self.extracted,
                    "failed": self.failed, "skipped": skipped, "interrupted": interrupted,
                    "device": str(self.models.device), "batch_size": self.models.batch_size}
        self._write_manifest(finished)
        merged = None
        if self.place.num_parts == 1:
            merged = mf.merge(self.out, self.shard_videos, config=self.config)
        return {
            "extracted": self.extracted, "skipped": skipped, "failed": self.failed, "short": len(self.short),
            "clips": self.clips, "run_seconds": round(seconds, 3),
            "clips_per_s": round(self.clips / seconds, 3) if seconds > 0 else 0.0,
            "videos_per_s": round(self.extracted / seconds, 3) if seconds > 0 else 0.0,
            "shards_written": self.shards_this_run, "part": self.place.part, "num_parts": self.place.num_parts,
            "interrupted": interrupted, "out": str(self.out), "failures_file": str(self.failures.path),
            "merged": merged is not None, "compute_dtype": self.models.compute_dtype,
            "batch_size": self.models.batch_size, "config": asdict(cfg),
        }

    def _step(self, pending: deque, bar, t0: float) -> None:
        """One batch of clips, taken in order from the pending videos; finished videos go to the shard."""
        import torch

        want = self.models.batch_size
        parts = []
        for p in pending:
            if want == 0:
                break
            take = min(want, self.cfg.num_clips - p.done)
            if take:
                parts.append((p, p.done, p.done + take))
                want -= take
        clips = parts[0][0].frames[parts[0][1]:parts[0][2]] if len(parts) == 1 else \
            torch.cat([p.frames[a:b] for p, a, b in parts])  # (b, L, S, S, 3) uint8
        outs = self.models(clips)
        offset = 0
        for p, a, b in parts:
            for m, y in outs.items():
                p.outputs[m].append(y[offset:offset + b - a].numpy())
            p.done = b
            offset += b - a
        while pending and pending[0].done == self.cfg.num_clips:
            self._add(pending.popleft())
            bar.update(1)
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.set_postfix_str(f"{self.clips / elapsed:.1f} clips/s", refresh=False)
