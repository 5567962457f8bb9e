"""Running backbones over uint8 clips: the one forward shared by extraction and predict.

``BackboneRunner`` takes clips as decoded, (B, L, S, S, 3) uint8 on the device, and for one
backbone: scales and normalises them with the backbone's mean/std on the device (cheaper than on
the decoding CPU: docs/pitfalls.md), lays them out channels_last_3d (model and input both), runs
the backbone under bf16 autocast when asked (on CUDA, or on a CPU with native bf16), and rounds
the res5 map to float16, the dtype of the shards, so that what predict feeds an aggregator equals
what it was fitted on (and, for a model extracted with --spatial-pool, the float16 map's mean over
H' x W', rounded to float16 again, as it was stored). Maps come out channels-last, (B, T', H', W',
C): the layout of the shards and of the aggregators' input, and a view of what a channels_last_3d
model returns, so no copy is made. On CUDA the batch shape is kept fixed (the last batch padded)
so cudnn.benchmark tunes once, and on out-of-memory the batch is halved and the work goes on.

A backbone whose cost depends on the clip (VA-RED², extract/models/vared.py: it has ``last_cost``,
the GFLOPs of each clip of its last forward) leaves each clip's figure in ``last_gflops[name]``
after every call: extraction stores them (``gflops/<model>``, docs/format.md), predict can count them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from faster.extract import video

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


class BackboneRunner:
    """Backbones (name -> module with ``.mean``/``.std``) on ``device``, ``batch_size`` clips per forward.

    ``amp``: run under bf16 autocast (extraction on a bf16-capable GPU, or predict of a run whose
    features were computed so). ``pooled``: the models whose maps are averaged over H' x W'
    (--spatial-pool). ``sizes``: each model's crop, when it differs from the decoded clips' (a
    big-little pair decoded once at the larger crop: the smaller is resized on the device,
    antialiased bilinear, after normalisation, which commutes with it). ``calls[name]`` counts the
    clips each backbone has processed. ``last_gflops[name]``: the (B,) float32 GFLOPs of each clip
    of the last call for a backbone whose cost depends on the clip (``clip_dependent``), else None.
    """

    def __init__(self, models: dict[str, nn.Module], device: torch.device, *, batch_size: int = 8,
                 amp: bool = False, pooled: set[str] | frozenset[str] = frozenset(),
                 sizes: dict[str, int] | None = None, clip_len: int = 8,
                 frames: dict[str, tuple[int, ...]] | None = None):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.amp = bool(amp)
        self.batch_size = int(batch_size)
        self.models = {}
        self.frames = {name: tuple(int(i) for i in idx) for name, idx in (frames or {}).items()}
        for name, model in models.items():  # channels_last_3d on CPU too: faster there as well (see BENCHMARKS.md)
            model = model.to(self.device).eval()
            fold_batchnorm(model, len(self.frames[name]) if name in self.frames else clip_len)
            self.models[name] = model.to(memory_format=torch.channels_last_3d)
        self.calls = {name: 0 for name in self.models}
        self.clip_dependent = frozenset(name for name, m in self.models.items() if hasattr(m, "last_cost"))
        self.last_gflops: dict[str, np.ndarray | None] = {name: None for name in self.models}
        self._costs: list[np.ndarray] = []
        self.pooled = frozenset(pooled)
        self.sizes = dict(sizes or {})  # model -> its crop; clips of another size are resized to it

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.amp else "float32"

    def _forward(self, name: str, clips: torch.Tensor) -> torch.Tensor:
        import torch
        from torch.nn import functional

        model = self.models[name]
        b = clips.shape[0]
        idx = self.frames.get(name)
        if idx is not None and idx != tuple(range(clips.shape[1])):  # this model's frames of the grid
            clips = clips[:, list(idx)]  # (b, L_model, S, S, 3)
        if self.cuda and b < self.batch_size and name not in self.clip_dependent:
            # fixed shapes: cudnn.benchmark tunes once (a clip-dependent model splits each batch by its
            # gates' choices anyway, and padding clips would go through the gates too)
            clips = torch.cat([clips, clips.new_zeros((self.batch_size - b, *clips.shape[1:]))])
        x = video.normalise_clips(clips, model.mean, model.std)  # (B, 3, L, S, S) float32
        size = self.sizes.get(name, x.shape[-1])
        if size != x.shape[-1]:  # a smaller model of a big-little pair: the same field of view, resized
            B, _, L, S, _ = x.shape
            x = functional.interpolate(x.reshape(B, 3 * L, S, S), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).reshape(B, 3, L, size, size)  # (B, 3, L, s, s)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            y = model(x)  # (B, C, T', H', W'), channels_last_3d in memory
        if name in self.clip_dependent:  # this batch's per-clip GFLOPs (the padding left out)
            self._costs.append(model.last_cost[:b].float().cpu().numpy())
        return y[:b].to(torch.float16).permute(0, 2, 3, 4, 1)  # (b, T', H', W', C): a view, no copy

    def check_bf16(self, clips: torch.Tensor) -> dict[str, float]:
        """Per model, the relative L2 error of its bf16 map against fp32 on ``clips`` (uint8): some
        cuDNN versions computed bf16 conv3d wrongly (docs/pitfalls.md); ~1% is bf16's own rounding."""
        import torch

        errors = {}
        amp, self.amp = self.amp, False
        try:
            for name in self.models:
                ref = self._forward(name, clips.to(self.device)).float()
                self.amp = True
                got = self._forward(name, clips.to(self.device)).float()
                self.amp = False
                errors[name] = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12))
        finally:
            self.amp = amp
        return errors

    def __call__(self, name: str, clips: torch.Tensor) -> torch.Tensor:
        """res5 maps (B, T', H', W', C) float16, channels-last as the shards store them, on this
        runner's device, of ``clips`` (B, L, S, S, 3) uint8 ((B, T', 1, 1, C) for a pooled model)."""
        import torch

        clips = clips.to(self.device, non_blocking=True)
        pieces: list[torch.Tensor] = []
        self._costs = []
        start = 0
        while start < clips.shape[0]:
            piece = clips[start:start + self.batch_size]
            try:
                pieces.append(self._forward(name, piece))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise RuntimeError("CUDA out of memory with a batch of one clip: use a smaller --size, "
                                       "fewer --model, or a larger GPU") from None
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: batch size halved to %d clips", self.batch_size)
                continue
            start += piece.shape[0]
        self.calls[name] += int(clips.shape[0])
        self.last_gflops[name] = np.concatenate(self._costs).astype(np.float32) if name in self.clip_dependent else None
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if name in self.pooled:
            y = y.float().mean(dim=(2, 3), keepdim=True).half()  # (B, T', 1, 1, C)
        return y


def fold_batchnorm(model: nn.Module, clip_len: int = 8, size: int = 64) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into that convolution's
    weights and bias, and replace it by an identity; return how many were folded.

    Inference only (the running statistics are constants then): w' = w * g / sqrt(v + eps), b' =
    (b - m) * g / sqrt(v + eps) + beta. The pairs are those of :func:`batchnorm_pairs`. Batch norm
    is a large share of a CPU's bf16 time (see BENCHMARKS.md).
    """
    import torch
    from torch import nn

    pairs = batchnorm_pairs(model, clip_len, size)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    folded = 0
    with _one_thread(), torch.no_grad():
        for conv, bn in pairs:
            if not bn.track_running_stats or bn.running_var is None:
                continue
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
            conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.bias = nn.Parameter(bias * scale + shift)
            parent, attr = parents[id(bn)]
            setattr(parent, attr, nn.Identity())
            folded += 1
    return folded


def batchnorm_pairs(model: nn.Module, clip_len: int = 8, size: int = 64) -> list[tuple[nn.Module, nn.Module]]:
    """The (convolution, batch norm) pairs of ``model`` that fold: a norm whose input is the very
    tensor a convolution module just returned, and that no other module read.

    Found by one forward of a (1, 3, clip_len, S, S) clip with hooks on every leaf module, in which
    every plain convolution returns zeros of its output's shape instead of convolving: the pairs come
    from which module returned which tensor, never from values, and the convolutions were most of
    the probe's cost (their first calls set up oneDNN kernels: 2-4 s for R(2+1)D-50 + R2D-26 at
    64 px, most of predict's start-up; BENCHMARKS.md). S is the smallest input that leaves a 1 x 1
    map (the model's ``spatial_stride``), else ``size``: the rest of the probe (norms, activations,
    sums) costs in proportion to it. A model whose forward fails so (e.g. one that reads a
    convolution's values) is probed with real convolutions at ``size``, as before. (A meta-tensor
    probe would cost nothing either, but its first convolution imports sympy: ~1.5 s.)
    """
    import torch

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []  # nothing to fold (e.g. the transformers): no probe
    p = next(model.parameters(), None)
    device = p.device if p is not None else None
    smallest = min(size, int(getattr(model, "spatial_stride", size) or size))  # a 1 x 1 map at the end
    tries = [(smallest, True), (size, True), (size, False)] if smallest < size else [(size, True), (size, False)]
    with _one_thread():
        for s, shapes_only in tries:
            try:
                with torch.no_grad():
                    return _trace_pairs(model, clip_len, s, device, shapes_only=shapes_only)
            except Exception as err:  # noqa: BLE001 - a model that cannot take the probe clip: leave it as it is
                log.debug("batch norm pairs of %s at %d px (convolutions %s): %s", type(model).__name__, s,
                          "as shapes" if shapes_only else "run", err)
    return []


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's CPU ops on one thread for a while: the probe's and the fold's are small (per-channel
    vectors, tiny maps), and on a busy CPU each parallel op waits a scheduler time slice for its
    OpenMP team (measured: 6-9 ms per op, 2 s for folding R(2+1)D-50 + R2D-26, at load average 4)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _conv_shape(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Zeros of the shape ``conv`` (Conv1d/2d/3d, its own forward) returns for ``x``, computed
    without convolving (torch.nn.ConvNd's output-size formula, "same"/"valid" padding included)."""
    dims = conv.weight.dim() - 2
    if isinstance(conv.padding, str):
        pad = [(d * (k - 1)) // 2 if conv.padding == "same" else 0 for d, k in zip(conv.dilation, conv.kernel_size)]
        if conv.padding == "same":  # "same" keeps the size exactly (stride 1 only)
            return x.new_zeros((*x.shape[:-dims - 1], conv.out_channels, *x.shape[-dims:]))
    else:
        pad = list(conv.padding)
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, p, d, k, s in zip(x.shape[-dims:], pad, conv.dilation, conv.kernel_size, conv.stride)]
    if x.shape[-dims - 1] != conv.in_channels or min(out) < 1:
        raise RuntimeError(f"{type(conv).__name__} cannot take an input of shape {tuple(x.shape)}")
    return x.new_zeros((*x.shape[:-dims - 1], conv.out_channels, *out))


def _trace_pairs(model: nn.Module, clip_len: int, size: int, device: torch.device | None, *,
                 shapes_only: bool) -> list[tuple[nn.Module, nn.Module]]:
    import functools

    import torch
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    produced: dict[int, nn.Module] = {}  # id(output tensor) -> the convolution that returned it
    readers: dict[int, int] = {}  # id(tensor) -> how many modules read it
    found: list[tuple[nn.Module, nn.Module, int]] = []
    alive: list = []  # every traced tensor stays referenced, so that no two share an id during the trace

    def hook(module, inputs, output):
        alive.append((inputs, output))
        for x in inputs:
            if isinstance(x, torch.Tensor):
                readers[id(x)] = readers.get(id(x), 0) + 1
        if isinstance(module, convs) and isinstance(output, torch.Tensor):
            produced[id(output)] = module
        if isinstance(module, norms) and inputs and id(inputs[0]) in produced:
            found.append((produced[id(inputs[0])], module, id(inputs[0])))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    patched = []
    if shapes_only:  # only the stock forwards: a subclass's own forward may differ in shape
        patched = [m for m in leaves if type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)]
        for m in patched:
            m.forward = functools.partial(_conv_shape, m)
    try:
        model(torch.zeros(1, 3, clip_len, size, size, device=device))  # (1, 3, L, S, S)
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward
        alive.clear()
    return [(conv, bn) for conv, bn, tensor in found if readers.get(tensor, 0) == 1]
