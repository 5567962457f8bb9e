"""Aggregators of clip feature maps (paper, "Learning to Aggregate"): FAST-GRU (Eq. 4) and the
baselines of Table 3 — average pooling of clip scores, Concat (Eq. 5), LSTM and GRU (Eqs. 2-3) —
and the base class ``Aggregator`` that every registered aggregator shares (avg, concat, lstm, gru,
fastgru here; netvlad and nextvlad in aggregate/vlad.py, tam in aggregate/tam.py; the names:
``faster.aggregate.names()``).

Every aggregator reads N clip maps x_0 .. x_{N-1} (res5 maps, T' x H' x W' x C) that come from the
expensive or the cheap backbone according to the E:C pattern, and returns class logits. The
recurrent ones follow Eq. 1: o_0 = x_0, o_t = f(o_{t-1}, x_t) for t = 1..N-1, then global average
pooling, dropout and a fully-connected layer on o_{N-1}.

Maps come channels last, (..., T', H', W', C), exactly as the shards store them; every layer works
in that layout. 1x1x1 convolutions are matrix products over the channel axis (``Conv1x1x1``): the
same maths and multiply-adds as ``nn.Conv3d(kernel_size=1)``, without a layout change.

Sources of different widths or grids (a 512-channel torchvision map beside a 2048-channel one) are
aligned before aggregation: each map is average-pooled to the common grid (the smallest T', H', W'
of the sources in use) and projected by a learned 1x1x1 convolution to the common width (the
expensive source's C). When the sources agree, as in the paper, nothing is added.

Two ways to run one aggregator, which give the same result (tests/test_aggregate.py):
  * ``forward(x, mask)`` on a batch of whole videos (training, evaluation);
  * ``init_state`` / ``step`` / ``logits``, one clip at a time (online prediction): the prediction
    after the clips seen so far.
Both are built from the public pieces ``encode`` / ``fold`` / ``readout`` (see ``Aggregator``),
which a schedule (a learned policy) also drives directly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.aggregate import check_dropout, register
from faster.errors import BadValue

SOURCES = ("expensive", "cheap")
State = dict[str, Any]


class Conv1x1x1(nn.Linear):
    """A 1x1x1 3D convolution over a channels-last map (..., C_in) -> (..., C_out)."""


class Align(nn.Module):
    """Pool a source's map to the common grid and project it to the common width (identity when equal).

    ``pooled=True``: the aggregator works on globally pooled vectors, so only the width is aligned.
    """

    def __init__(self, shape: Sequence[int], width: int, grid: Sequence[int], *, pooled: bool):
        super().__init__()
        c, *src_grid = shape
        self.pooled = pooled
        self.grid = tuple(grid)
        self.pool = not pooled and tuple(src_grid) != self.grid
        self.proj = Conv1x1x1(c, width) if c != width else None
        # Per-channel input standardisation, set from the training features by fit
        # (Aggregator.set_input_stats) and saved in the state dict, so evaluate and predict apply the
        # same. A backbone's res5 channels share large offsets (random-init ones: a mean ~10x the
        # spread across videos) that a few epochs on the raw maps do not overcome. Identity by default.
        self.register_buffer("in_mean", torch.zeros(c))
        self.register_buffer("in_std", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        # x: (M, T', H', W', C) channels last. Averaging commutes with the per-channel
        # standardisation, so the maps are pooled first and fewer values standardised.
        if self.pooled:
            x = x.mean(dim=(1, 2, 3))  # (M, C)
        elif self.pool:  # the pooling op wants channels first: a view for it, channels last again after
            x = F.adaptive_avg_pool3d(x.movedim(-1, 1), self.grid).movedim(1, -1)  # (M, t, h, w, C)
        x = (x - self.in_mean) / self.in_std
        return self.proj(x) if self.proj is not None else x


class Aggregator(nn.Module):
    """Base class: alignment of the sources, the batched forward and the online step API.

    Args:
        num_classes: output classes.
        sources: per source in use ("expensive", "cheap"), its map shape [C, T', H', W'] (the
            order stored in checkpoints; the maps themselves come channels last, see ``forward``).
        dropout: dropout before the final fully-connected layer.

    Public API (fit, evaluate, the schedules and predict use only these):

      * ``forward(x, mask)``, ``forward_with_state(x, mask)``: whole videos;
      * ``sequence(x, mask)``: every clip aligned and embedded, in clip order; ``encode(x, source)``:
        a batch of single clips of one source aligned and embedded;
      * ``fold(state, x)``: Eq. 1 on one encoded clip (``state=None`` starts, o_0 = x_0);
        ``fold_sequence(seq)``: the same over a whole sequence; ``readout(state, num_seen)``: logits;
      * ``init_state`` / ``step`` / ``logits``: the online step over raw maps;
      * ``state_vector(state)``, ``state_width()``, ``set_input_stats``; class attributes ``pooled``
        (the aggregator reads globally pooled vectors) and ``stateful`` (its state is a recurrent
        state a policy's gate can read).

    To add an aggregator, subclass this, register it (``@register(name)``) and implement
    ``start(x0)`` (the state from the first encoded clip, o_0), ``update(state, x)`` (Eq. 1's f) and
    ``readout(state, num_seen)``; optionally ``embed(x, source)`` (a per-source transform after
    alignment, identity by default), ``fold_sequence(seq)`` (a faster batched loop; it must equal
    folding clip by clip) and ``state_vector``; set ``pooled`` / ``stateful``.
    """

    pooled = False
    stateful = True  # a recurrent step state that a gate can read (aggregate/policy.py); avg and tam: False

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise BadValue(f"num_classes must be >= 1, got {num_classes}")
        if not sources or set(sources) - set(SOURCES):
            raise BadValue(f"sources must be a non-empty subset of {SOURCES}, got {sorted(sources)}")
        for name, shape in sources.items():
            if len(shape) != 4 or min(shape) < 1:
                raise BadValue(f"source {name!r}: shape must be [C, T', H', W'] with positive sizes, got {shape}")
        check_dropout(dropout)
        self.kwargs: dict[str, Any] = {"num_classes": int(num_classes), "dropout": float(dropout),
                                       "sources": {k: [int(v) for v in s] for k, s in sources.items()}}
        self.num_classes = int(num_classes)
        main = sources["expensive"] if "expensive" in sources else sources["cheap"]
        self.width = int(main[0])
        self.grid = tuple(min(int(s[i]) for s in sources.values()) for i in (1, 2, 3))
        self.align = nn.ModuleDict({k: Align(s, self.width, self.grid, pooled=self.pooled)
                                    for k, s in sources.items()})
        self.dropout = nn.Dropout(dropout)

    def set_input_stats(self, source: str, mean: Tensor, std: Tensor) -> None:
        """Standardise ``source``'s maps per channel with these training statistics, shape (C_src,)."""
        align = self.align[source]
        if mean.shape != align.in_mean.shape or std.shape != align.in_std.shape:
            raise BadValue(f"{source}: statistics of shape {tuple(mean.shape)}, {tuple(std.shape)}; "
                             f"expected {tuple(align.in_mean.shape)}")
        align.in_mean.copy_(mean)
        align.in_std.copy_(std.clamp_min(1e-6))

    def _channels(self, source: str) -> int:
        if source not in self.align:
            raise BadValue(f"this aggregator was built without a {source} source")
        return int(self.kwargs["sources"][source][0])

    # -- batched -----------------------------------------------------------------------------------
    def forward(self, x: dict[str, Tensor], mask: Sequence[bool]) -> Tensor:
        """Logits (B, num_classes) of whole videos.

        ``x[source]``: (B, n_source, T', H', W', C) channels last, as the shards store the maps: the
        clips of that source in order; ``mask[i]`` says whether clip i is expensive.
        """
        return self.forward_with_state(x, mask)[0]

    def forward_with_state(self, x: dict[str, Tensor], mask: Sequence[bool]) -> tuple[Tensor, Any]:
        """(logits (B, num_classes), the state after the last clip) of whole videos, as ``forward``;
        ``state_vector`` of that state is the video's final representation (distillation)."""
        state = self.fold_sequence(self.sequence(x, mask))
        return self.readout(state, len(mask)), state

    def sequence(self, x: dict[str, Tensor], mask: Sequence[bool]) -> Tensor:
        """(B, N, *feature): every clip of ``x`` (as ``forward`` takes it) aligned and embedded, in clip order."""
        positions = {"expensive": [i for i, m in enumerate(mask) if m],
                     "cheap": [i for i, m in enumerate(mask) if not m]}
        parts = {}
        for src, pos in positions.items():
            if not pos:
                continue
            if src not in x or src not in self.align:
                raise BadValue(f"the pattern needs {len(pos)} {src} clips but the aggregator "
                                 f"or the batch has no {src} source")
            xs, c = x[src], self._channels(src)
            if xs.dim() != 6 or xs.shape[1] != len(pos) or xs.shape[-1] != c:
                raise BadValue(f"{src} clips: expected (B, {len(pos)}, C-last maps) = (B, {len(pos)}, T', H', W', {c}), "
                                 f"got {tuple(xs.shape)}")
            B, n = xs.shape[:2]
            parts[src] = self.encode(xs.flatten(0, 1), src).unflatten(0, (B, n))  # (B, n, *feature)
        if len(parts) == 1:
            return next(iter(parts.values()))
        first = parts["expensive"]
        seq = first.new_empty((first.shape[0], len(mask), *first.shape[2:]))  # (B, N, *feature)
        for src, part in parts.items():
            seq[:, positions[src]] = part.to(seq.dtype)
        return seq

    def encode(self, x: Tensor, source: str) -> Tensor:
        """A batch of single clips of ``source``, (M, T', H', W', C) channels last, aligned and
        embedded: (M, *feature), what ``fold`` takes."""
        c = self._channels(source)
        if x.dim() != 5 or x.shape[-1] != c:
            raise BadValue(f"{source} clips: expected (M, T', H', W', C={c}) channels last, got {tuple(x.shape)}")
        return self.embed(self.align[source](x), source)

    def fold(self, state: Any, x: Tensor) -> Any:
        """Eq. 1 on one encoded clip x (B, *feature): ``state`` None starts (o_0 = x_0), otherwise
        o_t = f(o_{t-1}, x_t)."""
        return self.start(x) if state is None else self.update(state, x)

    def fold_sequence(self, seq: Tensor) -> Any:
        """The state after folding every clip of ``seq`` (B, N, *feature) in order."""
        state = None
        for x in seq.unbind(1):  # (B, *feature) each; unbind's backward stacks once (seq[:, t] would
            state = self.fold(state, x)  # zero-fill and add a whole-sequence gradient per step)
        return state

    # -- online ------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """An empty state for ``batch_size`` videos (no clip seen yet)."""
        return {"t": 0, "h": None, "batch_size": int(batch_size)}

    def step(self, state: State, x: Tensor, expensive: bool) -> State:
        """Fold one clip's map x (B, T', H', W', C_src), channels last, from the given source."""
        src = "expensive" if expensive else "cheap"
        c = self._channels(src)
        if x.dim() != 5 or x.shape[0] != state["batch_size"] or x.shape[-1] != c:
            raise BadValue(f"step expects (B={state['batch_size']}, T', H', W', C={c}) channels last, "
                             f"got {tuple(x.shape)}")
        return {**state, "t": state["t"] + 1, "h": self.fold(state["h"], self.encode(x, src))}

    def logits(self, state: State) -> Tensor:
        """(B, num_classes): the prediction after the clips folded so far."""
        if state["t"] == 0:
            raise BadValue("no clip has been stepped yet")
        return self.readout(state["h"], state["t"])

    def state_vector(self, h: Any) -> Tensor:
        """(B, D): a step state pooled to a vector (a map's mean over its grid; an LSTM's hidden h)."""
        if isinstance(h, tuple):
            h = h[0]
        return h.mean(dim=tuple(range(1, h.dim() - 1))) if h.dim() > 2 else h

    def state_width(self) -> int:
        """D of ``state_vector``, found by folding one zero clip."""
        src = "cheap" if "cheap" in self.align else "expensive"
        c, *grid = self.kwargs["sources"][src]
        p = next(self.parameters())
        x = torch.zeros((2, *grid, c), device=p.device, dtype=p.dtype)  # (2, T', H', W', C)
        with torch.no_grad():
            h = self.fold(None, self.encode(x, src))
        return int(self.state_vector(h).shape[-1])

    # -- to implement ------------------------------------------------------------------------------
    def embed(self, x: Tensor, source: str) -> Tensor:
        """Per-source hook after alignment, (M, T', H', W', C) -> (M, *feature); identity here
        (avg classifies each clip, the VLADs take descriptors, TAM projects)."""
        return x

    def start(self, x0: Tensor) -> Any:
        """The state from the first encoded clip (o_0 = x_0 in Eq. 1)."""
        raise NotImplementedError

    def update(self, state: Any, x: Tensor) -> Any:
        """Eq. 1's f: the state after one more encoded clip."""
        raise NotImplementedError

    def readout(self, state: Any, num_seen: int) -> Tensor:
        """(B, num_classes): logits from the state after ``num_seen`` clips."""
        raise NotImplementedError


class _MapHead(nn.Module):
    """Global average pooling over (T', H', W'), dropout, fc (paper: applied to o_{N-1})."""

    def __init__(self, width: int, num_classes: int, dropout: nn.Module):
        super().__init__()
        self.dropout = dropout
        self.fc = nn.Linear(width, num_classes)

    def forward(self, o: Tensor) -> Tensor:
        return self.fc(self.dropout(o.mean(dim=(1, 2, 3))))  # (B, T', H', W', C) -> (B, K)


@register("avg")
class AvgPool(Aggregator):
    """Average pooling (Table 3 "Avg. pool"): a linear classifier per backbone on globally pooled
    features; the video's score is the mean of the clips' softmax scores, whichever backbone made
    them. Trained end to end on that mean: logits = log(mean_i softmax_i), so softmax(logits) is
    exactly the averaged score."""

    pooled = True
    stateful = False  # its state is a running mean of class scores: nothing a gate could read

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        # a classifier per backbone, on its own width: no projection needed
        self.align = nn.ModuleDict({k: Align(s, int(s[0]), self.grid, pooled=True) for k, s in sources.items()})
        self.classifier = nn.ModuleDict({k: nn.Linear(int(s[0]), num_classes) for k, s in sources.items()})

    def embed(self, x: Tensor, source: str) -> Tensor:
        return F.log_softmax(self.classifier[source](self.dropout(x)).float(), dim=-1)  # (M, K) log-scores

    def fold_sequence(self, seq: Tensor) -> Tensor:
        return torch.logsumexp(seq, dim=1)  # (B, K): log of the summed scores

    def start(self, x0: Tensor) -> Tensor:
        return x0

    def update(self, state: Tensor, x: Tensor) -> Tensor:
        return torch.logaddexp(state, x)

    def readout(self, state: Tensor, num_seen: int) -> Tensor:
        return state - math.log(num_seen)


@register("concat")
class Concat(Aggregator):
    """Concat (Eq. 5): o_t = ReLU(BN(W o_{t-1} + U x_t)), W and U 1x1x1 convolutions that keep the
    map's resolution; o_0 = x_0; then pooling, dropout, fc."""

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        C = self.width
        self.W = Conv1x1x1(C, C, bias=False)
        self.U = Conv1x1x1(C, C, bias=False)
        self.bn = nn.BatchNorm1d(C)  # over every map position: the statistics of BatchNorm3d
        self.head = _MapHead(C, num_classes, self.dropout)

    def _cell(self, o: Tensor, ux: Tensor) -> Tensor:
        y = self.W(o) + ux  # (B, T', H', W', C)
        return F.relu(self.bn(y.reshape(-1, y.shape[-1])).view_as(y))

    def fold_sequence(self, seq: Tensor) -> Tensor:
        ux = self.U(seq[:, 1:])  # (B, N-1, T', H', W', C): the input side of every step at once
        o = seq[:, 0]
        for u in ux.unbind(1):  # (B, T', H', W', C) each (see Aggregator.fold_sequence)
            o = self._cell(o, u)
        return o

    def start(self, x0: Tensor) -> Tensor:
        return x0

    def update(self, state: Tensor, x: Tensor) -> Tensor:
        return self._cell(state, self.U(x))

    def readout(self, state: Tensor, num_seen: int) -> Tensor:
        return self.head(state)


class _PooledRNN(Aggregator):
    """torch's recurrent cells on globally pooled clip features, hidden size C; o_0 = x_0 (Eq. 1)."""

    pooled = True
    cell_type: type[nn.Module] = nn.GRUCell

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        self.cell = self.cell_type(self.width, self.width)
        self.fc = nn.Linear(self.width, num_classes)

    def _hidden(self, state: Any) -> Tensor:
        return state

    def readout(self, state: Any, num_seen: int) -> Tensor:
        return self.fc(self.dropout(self._hidden(state)))


@register("gru")
class GRU(_PooledRNN):
    """GRU baseline (Eqs. 2-3, torch.nn.GRUCell) on pooled features; o_0 = x_0."""

    cell_type = nn.GRUCell

    def start(self, x0: Tensor) -> Tensor:
        return x0

    def update(self, state: Tensor, x: Tensor) -> Tensor:
        return self.cell(x, state.to(x.dtype))


@register("lstm")
class LSTM(_PooledRNN):
    """LSTM baseline (Graves 2013's three-gate variant, torch.nn.LSTMCell) on pooled features;
    hidden state h_0 = x_0, cell c_0 = 0."""

    cell_type = nn.LSTMCell

    def start(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        return x0, torch.zeros_like(x0)

    def update(self, state: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        h, c = state
        return self.cell(x, (h.to(x.dtype), c.to(x.dtype)))

    def _hidden(self, state: tuple[Tensor, Tensor]) -> Tensor:
        return state[0]


@register("fastgru")
class FastGRU(Aggregator):
    """FAST-GRU (Eq. 4 and Fig. 2b): a GRU whose transforms are 1x1x1 3D convolutions over the full
    T' x H' x W' map, with bottleneck gates.

        r'_t = ReLU(U_rx x_t + U_ro o_{t-1}),   r_t = sigmoid(W_r r'_t)      (C -> C/r -> C)
        z'_t = ReLU(U_zx x_t + U_zo o_{t-1}),   z_t = sigmoid(W_z z'_t)
        c_t  = tanh(V_x x_t + V_o (r_t * o_{t-1}))                           (two C -> C convolutions)
        o_t  = (1 - z_t) * o_{t-1} + z_t * c_t,   o_0 = x_0

    then global average pooling, dropout, fc. Multiply-adds per map position and step:
    4 C^2/r (U) + 2 C^2/r (W) + 2 C^2 (V) = 3.5 C^2 at r = 4, the cost Table 4 implies.
    """

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5,
                 reduction: int = 4):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        C = self.width
        if reduction < 1 or C % reduction:
            raise BadValue(f"reduction must divide the width {C}, got {reduction}")
        self.kwargs["reduction"] = int(reduction)
        Cr = C // reduction
        self.gates_x = Conv1x1x1(C, 2 * Cr)  # [U_rx; U_zx]
        self.gates_o = Conv1x1x1(C, 2 * Cr, bias=False)  # [U_ro; U_zo]
        self.recover_r = Conv1x1x1(Cr, C)  # W_r
        self.recover_z = Conv1x1x1(Cr, C)  # W_z
        self.cand_x = Conv1x1x1(C, C)  # V_x
        self.cand_o = Conv1x1x1(C, C, bias=False)  # V_o
        self.head = _MapHead(C, num_classes, self.dropout)

    def _cell(self, o: Tensor, gx: Tensor, vx: Tensor) -> Tensor:
        # o: (B, T', H', W', C); gx: (B, T', H', W', 2C/r) = U_*x x_t; vx: (B, T', H', W', C) = V_x x_t
        o = o.to(vx.dtype)
        r_, z_ = F.relu(gx + self.gates_o(o)).chunk(2, dim=-1)  # r'_t, z'_t: (B, T', H', W', C/r)
        r = torch.sigmoid(self.recover_r(r_))
        z = torch.sigmoid(self.recover_z(z_))
        cand = torch.tanh(vx + self.cand_o(r * o))
        return (1 - z) * o + z * cand

    def fold_sequence(self, seq: Tensor) -> Tensor:
        rest = seq[:, 1:]  # (B, N-1, T', H', W', C): the input side of steps 1..N-1 at once
        gx, vx = self.gates_x(rest), self.cand_x(rest)
        o = seq[:, 0]
        for g, v in zip(gx.unbind(1), vx.unbind(1)):  # (B, T', H', W', 2C/r), (B, T', H', W', C) per step
            o = self._cell(o, g, v)
        return o

    def start(self, x0: Tensor) -> Tensor:
        return x0

    def update(self, state: Tensor, x: Tensor) -> Tensor:
        return self._cell(state, self.gates_x(x), self.cand_x(x))

    def readout(self, state: Tensor, num_seen: int) -> Tensor:
        return self.head(state)


def build(name: str, **kwargs: Any) -> Aggregator:
    """The aggregator ``name`` built from its constructor kwargs (as stored in a checkpoint)."""
    from faster.aggregate import get

    return get(name)(**kwargs)
from faster.aggregate import tam as _tam, vlad as _vlad  # noqa: E402,F401  registers netvlad, nextvlad, tam
