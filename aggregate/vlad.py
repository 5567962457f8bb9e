"""Cluster-and-aggregate aggregators: NetVLAD and NeXtVLAD on cached clip maps.

The "cluster-and-aggregate models" of Fewer Frames (Bhardwaj et al., CVPR 2019, Sec. 3):

  * ``netvlad``: NetVLAD (Arandjelovic et al., CVPR 2016) as used for video by ActionVLAD (Girdhar
    et al., CVPR 2017, github.com/rohitgirdhar/ActionVLAD) and LOUPE (Miech et al., 2017,
    github.com/antoine77340/LOUPE, loupe.py);
  * ``nextvlad``: NeXtVLAD (Lin et al., ECCV workshops 2018, github.com/linrongc/youtube-8m,
    nextvlad.py).

Adapted to cached clip features: the "frames" whose descriptors are clustered are the T' steps of
every clip, each the clip map pooled over H' x W' (the default ``descriptors="steps"``, as the
issue specifies; ``"positions"`` keeps every T' x H' x W' position, ``"clips"`` one vector per
clip), taken from the expensive or the cheap backbone by the E:C pattern and aligned as the base
class does; a learned linear layer first reduces the 2048 res5 channels to ``dim`` = 256.

Online semantics are exact: the state after clip t is the running sum over the descriptors seen so
far of the soft-assigned residuals, V_k = sum_i a_k(x_i) (x_i - c_k), so stepping clip by clip and
the batched forward reach the same V, and the prediction after t clips is the one the video would
get if it ended there.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.aggregate import register
from faster.aggregate.models import Aggregator
from faster.errors import BadValue

DESCRIPTORS = ("positions", "steps", "clips")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise BadValue(f"{name} must be a positive integer, got {value!r}")


class _VLAD(Aggregator):
    """Shared part: descriptors of each clip, the running residual sums, the online step.

    Subclasses implement ``residuals(d)`` ((B, M, D) descriptors -> (B, K, F) residual sums) and
    ``readout``. The state is the (B, K, F) sum, so ``update`` is an addition.
    """

    pooled = False

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5,
                 dim: int = 256, descriptors: str = "steps"):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        _check_positive(dim=dim)
        if descriptors not in DESCRIPTORS:
            raise BadValue(f"unknown descriptors {descriptors!r}; expected one of {', '.join(DESCRIPTORS)}")
        self.kwargs.update(dim=int(dim), descriptors=descriptors)
        self.descriptor_mode = descriptors
        # a reduction, never an expansion: maps narrower than dim are used as they are
        self.dim = min(int(dim), self.width)
        self.reduce = nn.Linear(self.width, self.dim, bias=False) if self.dim < self.width else None

    def embed(self, x: Tensor, source: str) -> Tensor:
        """(M, T', H', W', C) aligned clips -> (M, P, D) descriptors (by ``descriptors``, reduced)."""
        if self.descriptor_mode == "positions":
            d = x.flatten(1, 3)  # (M, T'*H'*W', C)
        elif self.descriptor_mode == "steps":
            d = x.mean(dim=(2, 3))  # (M, T', C)
        else:
            d = x.mean(dim=(1, 2, 3)).unsqueeze(1)  # (M, 1, C)
        return self.reduce(d) if self.reduce is not None else d  # (M, P, D)

    def descriptors(self, x: dict[str, Tensor], mask: Sequence[bool]) -> Tensor:
        """(B, N*P, D): the descriptors the clusters see for a batch (e.g. for ``init_centres``)."""
        return self.sequence(x, mask).flatten(1, 2)  # (B, N, P, D) -> (B, N*P, D)

    def fold_sequence(self, seq: Tensor) -> Tensor:
        return self.residuals(seq.flatten(1, 2))  # (B, N*P, D) -> (B, K, F): every descriptor at once

    def start(self, x0: Tensor) -> Tensor:
        return self.residuals(x0)  # x0: (B, P, D)

    def update(self, state: Tensor, x: Tensor) -> Tensor:
        return state + self.residuals(x)

    def residuals(self, d: Tensor) -> Tensor:
        """(B, K, F): the soft-assigned residual sums V_k of descriptors d (B, M, D)."""
        raise NotImplementedError


@register("netvlad")
class NetVLAD(_VLAD):
    """NetVLAD over clip-map descriptors, with the video head of LOUPE (loupe.py, NetVLADModelLF).

        d_i       = R x_i                                  (C -> D, when C > D)
        a_k(d_i)  = softmax_k(BN(w_k . d_i))               (LOUPE's BN in place of the bias b_k)
        V_k       = sum_i a_k(d_i) (d_i - c_k)             (over every descriptor of every clip)
        v         = L2(concat_k L2(V_k))                   (intra-normalisation, then global)
        h         = BN(W_h dropout(v))                     (K*D -> hidden)
        y         = h * sigmoid(W_g h + b_g)               (context gating)
        logits    = W_c y + b_c

    Centres start random (LOUPE); ``init_centres`` sets them by k-means on L2-normalised
    descriptors (ActionVLAD), for fit to call before training.

    Multiply-adds per video, M = N x P descriptors (P = T' steps by default; T'H'W' or 1 by
    ``descriptors``), Y classes: M C D (reduction, only when C > D) + 2 M D K (assignment,
    aggregation) + K D H + H^2 + H Y (the H' x W' mean is not a multiply-add). At the defaults
    (K = 32, D = 256, H = 1024, steps) on 8 clips x 4 x 7 x 7 x 2048 and 400 classes, M = 32:
    0.027 GFLOPs (0.858 with ``descriptors="positions"``, M = 1,568).
    """

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5,
                 clusters: int = 32, dim: int = 256, hidden: int = 1024, descriptors: str = "steps"):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout, dim=dim, descriptors=descriptors)
        _check_positive(clusters=clusters, hidden=hidden)
        self.kwargs.update(clusters=int(clusters), hidden=int(hidden))
        K, D, H = int(clusters), self.dim, int(hidden)
        self.clusters = K
        self.assign = nn.Linear(D, K, bias=False)  # w_k
        self.assign_bn = nn.BatchNorm1d(K)  # over every descriptor of the batch
        self.centres = nn.Parameter(torch.randn(K, D) / math.sqrt(D))  # c_k
        self.hidden = nn.Linear(K * D, H, bias=False)
        self.hidden_bn = nn.BatchNorm1d(H)
        self.gate = nn.Linear(H, H)  # context gating W_g, b_g
        self.fc = nn.Linear(H, num_classes)

    def residuals(self, d: Tensor) -> Tensor:
        # d: (B, M, D)
        logits = self.assign(d)  # (B, M, K)
        a = torch.softmax(self.assign_bn(logits.flatten(0, 1)).view_as(logits), dim=-1)  # (B, M, K)
        v = torch.einsum("bmk,bmd->bkd", a, d)  # (B, K, D): sum_i a_k(d_i) d_i
        return v - a.sum(dim=1).unsqueeze(-1) * self.centres  # (B, K, D): minus sum_i a_k(d_i) c_k

    def vlad_vector(self, state: Tensor) -> Tensor:
        """(B, K*D): the intra- and globally L2-normalised VLAD vector of residual sums (B, K, D)."""
        v = F.normalize(state, dim=-1)  # (B, K, D): each cluster's residual to unit length
        return F.normalize(v.flatten(1), dim=-1)  # (B, K*D)

    def readout(self, state: Tensor, num_seen: int) -> Tensor:
        h = self.hidden_bn(self.hidden(self.dropout(self.vlad_vector(state))))  # (B, H)
        y = h * torch.sigmoid(self.gate(h))
        return self.fc(y)

    @torch.no_grad()
    def init_centres(self, descriptors: Tensor, *, iters: int = 25, seed: int = 0) -> Tensor:
        """Set the centres by spherical k-means on L2-normalised ``descriptors`` (M, D) (ActionVLAD's
        initialisation), scaled back by the descriptors' mean norm so they sit in the space the
        residuals are taken in; the assignment weights w_k become the unit centre directions, so
        the soft assignment starts near the nearest-centre one. Returns the centres (K, D).

        ``descriptors`` are in the model's descriptor space: ``self.descriptors(x, mask)`` of
        training batches, flattened to (M, D). Needs M >= K."""
        d = descriptors.reshape(-1, descriptors.shape[-1]).to(self.centres.device, torch.float32)
        M, D = d.shape
        K = self.clusters
        if D != self.dim:
            raise BadValue(f"descriptors of width {D}; this netvlad clusters {self.dim}-d descriptors")
        if M < K:
            raise BadValue(f"k-means of {K} clusters needs at least {K} descriptors, got {M}")
        if iters < 1:
            raise BadValue(f"iters must be >= 1, got {iters}")
        scale = d.norm(dim=1).mean()
        u = F.normalize(d, dim=1)  # (M, D)
        g = torch.Generator(device="cpu").manual_seed(seed)
        c = u[torch.randperm(M, generator=g)[:K].to(u.device)].clone()  # (K, D)
        for _ in range(iters):
            nearest = (u @ c.T).argmax(dim=1)  # (M,): cosine similarity on the sphere
            sums = torch.zeros_like(c).index_add_(0, nearest, u)  # (K, D)
            counts = torch.bincount(nearest, minlength=K)
            empty = counts == 0
            if empty.any():  # re-seed an empty cluster at random descriptors
                c[empty] = u[torch.randint(M, (int(empty.sum()),), generator=g).to(u.device)]
            c[~empty] = F.normalize(sums[~empty], dim=1)
        self.centres.copy_(c * scale)
        self.assign.weight.copy_(c)
        return self.centres.detach().clone()


@register("nextvlad")
class NeXtVLAD(_VLAD):
    """NeXtVLAD (linrongc/youtube-8m nextvlad.py) over clip-map descriptors.

        d_i         = R x_i                                      (C -> D, when C > D)
        e_i         = W_e d_i + b_e                              (D -> lambda D)
        att_ig      = sigmoid(w_g . e_i + b_g)                   (g = 1..G)
        a_igk       = att_ig softmax_k(BN(W_a e_i))_gk           (lambda D -> G K, softmax per group)
        V_k         = sum_i sum_g a_igk (e_ig - c_k)             (e_ig: the g-th lambda D / G slice)
        v           = BN(concat_k L2(V_k))                       (intra-L2, then BN over the whole K F vector)
        h           = BN(W_h dropout(v))                         (K F -> hidden)
        y           = h * sigmoid(W_2 ReLU(BN(W_1 h)))           (squeeze-excitation gating, H -> H/r -> H)
        logits      = W_c y + b_c

    L2 (not L1) intra-normalisation and one BN over the flattened vector (not per frame position),
    as the reference does; some ports differ on both.

    Defaults: the reference's inputs are 1,024-d PCA'd frame features, one per frame (K = 128,
    hidden 2048). Here the descriptors are the clips' T' steps reduced to D = 256 (as netvlad's),
    lambda = 2, G = 8 groups of 64-d slices, K = 64, hidden 1024, r = 8: a 4,096-d VLAD vector and
    5.8 M weights. (With ``descriptors="positions"`` and the reference's sizes without a reduction,
    1,568 descriptors of 2,048 channels per 8-clip video, it would cost 20.7 GFLOPs, as much as
    FAST-GRU, and 149 M weights.)

    Multiply-adds per video, M = N x P descriptors, F = lambda D / G, Y classes:
    M C D (reduction, only when C > D) + M lambda D^2 (expansion) + M lambda D G (attention)
    + M lambda D G K (assignment) + M K lambda D (aggregation) + K F H + 2 H^2 / r + H Y.
    At the defaults on 8 clips x 4 x 7 x 7 x 2048 and 400 classes, M = 32: 0.035 GFLOPs (1.501 with
    ``descriptors="positions"``).
    """

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5,
                 clusters: int = 64, dim: int = 256, expansion: int = 2, groups: int = 8, hidden: int = 1024,
                 reduction: int = 8, descriptors: str = "steps"):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout, dim=dim, descriptors=descriptors)
        _check_positive(clusters=clusters, expansion=expansion, groups=groups, hidden=hidden, reduction=reduction)
        E = expansion * self.dim
        if E % groups:
            raise BadValue(f"groups must divide expansion x dim = {E}, got {groups}")
        if hidden % reduction:
            raise BadValue(f"reduction must divide hidden = {hidden}, got {reduction}")
        self.kwargs.update(clusters=int(clusters), expansion=int(expansion), groups=int(groups),
                           hidden=int(hidden), reduction=int(reduction))
        K, G, H = int(clusters), int(groups), int(hidden)
        self.clusters, self.groups, self.group_dim = K, G, E // G
        self.expand = nn.Linear(self.dim, E)
        self.attention = nn.Linear(E, G)
        self.assign = nn.Linear(E, G * K, bias=False)
        self.assign_bn = nn.BatchNorm1d(G * K)
        self.centres = nn.Parameter(torch.randn(K, self.group_dim) / math.sqrt(self.group_dim))
        self.vlad_bn = nn.BatchNorm1d(K * self.group_dim)
        self.hidden = nn.Linear(K * self.group_dim, H, bias=False)
        self.hidden_bn = nn.BatchNorm1d(H)
        self.se_down = nn.Linear(H, H // reduction, bias=False)
        self.se_bn = nn.BatchNorm1d(H // reduction)
        self.se_up = nn.Linear(H // reduction, H, bias=False)
        self.fc = nn.Linear(H, num_classes)

    def residuals(self, d: Tensor) -> Tensor:
        B, M, _ = d.shape
        e = self.expand(d)  # (B, M, lambda*D)
        att = torch.sigmoid(self.attention(e))  # (B, M, G)
        logits = self.assign_bn(self.assign(e).flatten(0, 1))  # (B*M, G*K)
        a = torch.softmax(logits.view(B, M, self.groups, self.clusters), dim=-1)  # (B, M, G, K)
        a = (a * att.unsqueeze(-1)).flatten(1, 2)  # (B, M*G, K)
        eg = e.view(B, M * self.groups, self.group_dim)  # (B, M*G, F): the group slices
        v = torch.einsum("bmk,bmf->bkf", a, eg)  # (B, K, F)
        return v - a.sum(dim=1).unsqueeze(-1) * self.centres

    def vlad_vector(self, state: Tensor) -> Tensor:
        """(B, K*F): the intra-L2-normalised VLAD vector (before its BN)."""
        return F.normalize(state, dim=-1).flatten(1)

    def readout(self, state: Tensor, num_seen: int) -> Tensor:
        v = self.vlad_bn(self.vlad_vector(state))  # (B, K*F)
        h = self.hidden_bn(self.hidden(self.dropout(v)))  # (B, H)
        gates = torch.sigmoid(self.se_up(F.relu(self.se_bn(self.se_down(h)))))
        return self.fc(h * gates)
