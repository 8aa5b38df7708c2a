"""Vector quantisation: nearest-code lookup with the straight-through estimator.

``z_q = argmin_{c in C} ||z - c||_2`` (NExT-OMNI, eq. for L_VQ; van den Oord et al. 2017,
"Neural Discrete Representation Learning"). Gradients pass straight through
(``z + sg(z_q - z)``); the encoder is pulled towards its code by the commitment term
``beta * ||z - sg(z_q)||^2``. The codebook is either learned by the codebook term
``||sg(z) - z_q||^2`` or, by default, updated as an exponential moving average of the
encoder outputs assigned to each code (Razavi et al. 2019, VQ-VAE-2), which is more stable.
Codes whose EMA usage falls below a threshold are restarted from random encoder outputs
so the codebook does not collapse. Before training, :meth:`VectorQuantizer.initialise_from`
can seed the codebook with k-means (Lloyd, k-means++ seeding) of encoder outputs over the
whole training set, so training starts from the best codebook for the initial encoder
rather than from one batch's random picks.

Multi-codebook: with ``num_codebooks = K`` each vector is split into K sub-vectors of
``dim / K``, each quantised against its own codebook of ``codebook_size`` codes. A position
then yields K ids, laid out per position (``[p0k0, p0k1, p1k0, ...]``), with
``id = k * codebook_size + code``, so the id space is ``K * codebook_size`` (not
``codebook_size ** K``) and each id names one sub-vector. The backbone embeds a position
by concatenating its K sub-vectors (:meth:`VectorQuantizer.ids_to_vectors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenization.config import QuantizerConfig


def kmeans(
    points: torch.Tensor,
    clusters: int,
    iterations: int = 25,
    generator: torch.Generator | None = None,
    restarts: int = 1,
    points_per_cluster: int | None = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), the best of
    ``restarts`` runs by the objective ``sum_i min_c ||x_i - c||^2``.

    ``points`` (M, d) -> (centres (clusters, d), sizes (clusters,)). With fewer distinct
    points than clusters some centres repeat; an emptied cluster is re-seeded at the point
    farthest from its centre. A run stops early once no point changes cluster.

    Above ``points_per_cluster * clusters`` points the centres are fitted on a random subset
    of that size (faiss's default cap, 256 a centre: more points move the centres little
    and cost linearly; 1,800 digit images give 460k patch latents); ``sizes`` still count
    every point. ``None`` fits on all of them.
    """
    points = points.detach().float()
    if points.shape[0] == 0:
        raise ValueError("kmeans: no points")
    fit = points
    if points_per_cluster is not None and points.shape[0] > points_per_cluster * clusters:
        keep = torch.randperm(points.shape[0], generator=generator)[: points_per_cluster * clusters]
        fit = points[keep.to(points.device)]
    runs = [_lloyd(fit, clusters, iterations, generator) for _ in range(restarts)]
    centres = min(runs, key=lambda c: float(_squared_distances(fit, c).min(-1).values.sum()))
    assignment = _squared_distances(points, centres).argmin(-1)
    return centres, torch.bincount(assignment, minlength=clusters).to(points.dtype)


def _squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(M, d), (C, d) -> (M, C) squared distances as one matrix product (faster than cdist)."""
    cross = points @ centres.T
    return (points.pow(2).sum(-1, keepdim=True) - 2 * cross + centres.pow(2).sum(-1)).clamp_min(0)


def _lloyd(
    points: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One k-means run: k-means++ seeds, then up to ``iterations`` Lloyd steps -> (C, d)."""
    norms = points.pow(2).sum(-1)

    def distances_to(pick: int) -> torch.Tensor:  # ||x - p||^2 as one matrix-vector product
        return (norms - 2 * (points @ points[pick]) + norms[pick]).clamp_min(0)

    picks = [int(torch.randint(0, points.shape[0], (1,), generator=generator))]
    nearest = distances_to(picks[0])
    for _ in range(1, clusters):
        picks.append(int(torch.multinomial(nearest.cpu() + 1e-12, 1, generator=generator)))
        nearest = torch.minimum(nearest, distances_to(picks[-1]))
    centres, previous = points[picks], None
    for _ in range(iterations):
        distances = _squared_distances(points, centres)  # (M, clusters)
        assignment = distances.argmin(-1)
        if previous is not None and torch.equal(assignment, previous):
            break
        previous = assignment
        one_hot = F.one_hot(assignment, clusters).to(points.dtype)  # (M, clusters)
        sizes, sums = one_hot.sum(0), one_hot.T @ points
        empty = sizes == 0
        centres = torch.where(empty[:, None], centres, sums / sizes.clamp_min(1)[:, None])
        if empty.any():
            error = distances.gather(1, assignment[:, None]).squeeze(1)
            centres[empty] = points[error.topk(int(empty.sum())).indices]
    return centres


def principal_directions(points: torch.Tensor, count: int) -> torch.Tensor:
    """(count, d): the top principal directions of ``points`` (M, d) as orthonormal rows,
    largest variance first, about the origin (centre the points first); rows past d are 0."""
    points = points.detach().float()
    _, vectors = torch.linalg.eigh(points.T @ points)  # ascending eigenvalues
    basis = points.new_zeros(count, points.shape[1])
    top = vectors.flip(-1).T[:count]
    basis[: top.shape[0]] = top
    return basis


def ridge_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    penalties: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
    power: int = 2,
    folds: int = 5,
) -> tuple[torch.Tensor, float]:
    """Ridge regression ``W = argmin ||X W - Y||^2 + lambda s ||W||^2`` with the penalty
    chosen by K-fold cross-validation over ``groups`` (so copies of one item never sit on
    both sides), scored by the mean ``|error| ** power`` (1 or 2); ``s`` is the mean
    diagonal of ``X^T X``, which makes ``penalties`` independent of the features' scale.

    ``features`` (M, F), ``targets`` (M, P), ``groups`` (M,) ints -> (W (F, P), lambda).
    Each fold's Gram matrix is computed once, so the search costs a few F x F solves.
    """
    x, y = features.detach().float(), targets.detach().float()
    fold = torch.unique(groups, return_inverse=True)[1] % folds
    parts = [fold == k for k in fold.unique().tolist()]
    grams = [x[rows].T @ x[rows] for rows in parts]
    moments = [x[rows].T @ y[rows] for rows in parts]
    gram, moment = sum(grams), sum(moments)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)

    def solve(g: torch.Tensor, b: torch.Tensor, penalty: float) -> torch.Tensor:
        return torch.linalg.solve(g + penalty * g.diagonal().mean().clamp_min(1e-12) * eye, b)

    def score(penalty: float) -> float:
        if len(parts) < 2:
            return 0.0  # a single group: nothing to validate on
        total = 0.0
        for rows, g, b in zip(parts, grams, moments, strict=True):
            w = solve(gram - g, moment - b, penalty)
            if power == 2:  # ||X_k W - Y_k||^2 = tr(W^T G_k W) - 2 tr(W^T b_k) + ||Y_k||^2
                total += float((w * (g @ w)).sum() - 2 * (w * b).sum() + y[rows].pow(2).sum())
            else:
                total += float((x[rows] @ w - y[rows]).abs().pow(power).sum())
        return total / y.numel()

    best = min(penalties, key=score)
    return solve(gram, moment, best), best


@dataclass
class QuantizerOutput:
    """``quantized`` (B, N, dim) with straight-through gradients; ``ids`` (B, N*K)."""

    quantized: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: float


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser over K sub-codebooks, EMA-updated by default."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        k, c, d = config.num_codebooks, config.codebook_size, config.dim // config.num_codebooks
        self.sub_dim = d
        codebook = torch.randn(k, c, d) / d**0.5
        if config.ema_decay > 0:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(k, c))
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        # Codes start from real encoder outputs on the first training batch (better usage).
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def vocab_size(self) -> int:
        return self.config.num_codebooks * self.config.codebook_size

    @property
    def tokens_per_vector(self) -> int:
        return self.config.num_codebooks

    def codebook_vectors(self) -> torch.Tensor:
        """(K * codebook_size, dim / K): row ``k * codebook_size + c`` is code c of book k."""
        return self.codebook.detach().reshape(-1, self.sub_dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, N, dim); updates the EMA codebook when training."""
        batch, positions, _ = z.shape
        k, c = self.config.num_codebooks, self.config.codebook_size
        flat = z.reshape(-1, k, self.sub_dim)  # (M, K, d)
        if self.training and not bool(self.initialised):
            self._initialise(flat.detach())
        book = self.codebook.to(flat.dtype)
        distances = (
            flat.pow(2).sum(-1, keepdim=True)
            - 2 * torch.einsum("mkd,kcd->mkc", flat, book)
            + book.pow(2).sum(-1).unsqueeze(0)
        )  # (M, K, C)
        codes = distances.argmin(-1)  # (M, K)
        selected = torch.stack([book[i][codes[:, i]] for i in range(k)], dim=1)  # (M, K, d)
        one_hot = F.one_hot(codes, c).to(flat.dtype)  # (M, K, C)
        if self.training and self.config.ema_decay > 0:
            self._ema_update(flat.detach(), one_hot)
        quantized = selected.reshape_as(z)
        loss = self.config.commitment * F.mse_loss(z, quantized.detach())
        if self.config.ema_decay == 0:
            loss = loss + F.mse_loss(quantized, z.detach())
        probabilities = one_hot.mean(0)  # (K, C)
        entropy = -(probabilities * (probabilities + 1e-10).log()).sum(-1)
        used = int((one_hot.sum(0) > 0).sum())
        ids = codes + torch.arange(k, device=codes.device) * c  # (M, K)
        return QuantizerOutput(
            quantized=z + (quantized - z).detach(),
            ids=ids.reshape(batch, positions * k),
            loss=loss,
            perplexity=entropy.exp().mean(),
            usage=used / (k * c),
        )

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids (B, N * K) of the nearest codes to ``z`` (B, N, dim), in any mode (no update)."""
        was_training = self.training
        self.eval()
        try:
            return self(z).ids
        finally:
            self.train(was_training)

    def ids_to_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat ids (B, N*K) -> vectors (B, N, dim), concatenating each position's K parts."""
        k, c = self.config.num_codebooks, self.config.codebook_size
        batch = ids.shape[0]
        grouped = ids.reshape(batch, -1, k)  # (B, N, K)
        codes = grouped - torch.arange(k, device=ids.device) * c
        if codes.min() < 0 or codes.max() >= c:
            raise ValueError(f"ids out of range for {k} codebooks of {c} codes")
        parts = [self.codebook[i][codes[..., i]] for i in range(k)]  # K x (B, N, d)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def initialise_from(
        self, vectors: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Seed every sub-codebook with k-means of ``vectors`` (M, dim), best of the config's
        ``init_restarts`` runs, e.g. the encoder's outputs on the whole training set; the EMA
        statistics start from the cluster sizes (scaled to a mean of 1, the unit of the
        dead-code threshold)."""
        k, d = self.config.num_codebooks, self.sub_dim
        restarts = self.config.init_restarts
        flat = vectors.reshape(-1, k, d)
        for i in range(k):
            centres, sizes = kmeans(
                flat[:, i], self.config.codebook_size, generator=generator, restarts=restarts
            )
            self.codebook.data[i] = centres.to(self.codebook.dtype)
            if self.config.ema_decay > 0:
                self.cluster_size[i] = (sizes / sizes.mean()).clamp_min(1e-3)
                self.embed_sum[i] = self.codebook[i] * self.cluster_size[i].unsqueeze(-1)
        self._broadcast()
        self.initialised.fill_(True)

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """Seed every code with a random encoder output of the first batch."""
        m = flat.shape[0]
        for i in range(self.config.num_codebooks):
            picks = torch.randint(0, m, (self.config.codebook_size,), device=flat.device)
            self.codebook.data[i] = flat[picks, i] + 1e-3 * torch.randn_like(flat[picks, i])
        if self.config.ema_decay > 0:
            self.embed_sum.copy_(self.codebook)
            self.cluster_size.fill_(1.0)
        self._broadcast()
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, one_hot: torch.Tensor) -> None:
        """EMA of assignment counts and sums, summed over data-parallel ranks."""
        decay = self.config.ema_decay
        counts = one_hot.sum(0)  # (K, C)
        sums = torch.einsum("mkc,mkd->kcd", one_hot, flat)  # (K, C, d)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.cluster_size.sum(-1, keepdim=True)
        codes = self.config.codebook_size
        smoothed = (self.cluster_size + 1e-5) / (total + codes * 1e-5) * total  # Laplace
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(-1))
        dead = self.cluster_size < self.config.dead_code_threshold
        if dead.any():
            for i in range(self.config.num_codebooks):
                rows = dead[i].nonzero().squeeze(-1)
                if rows.numel():
                    picks = torch.randint(0, flat.shape[0], (rows.numel(),), device=flat.device)
                    self.codebook[i, rows] = flat[picks, i]
                    self.embed_sum[i, rows] = flat[picks, i]
                    self.cluster_size[i, rows] = 1.0
            self._broadcast()

    def _broadcast(self) -> None:
        """Keep every data-parallel replica's codebook identical after random restarts."""
        if dist.is_available() and dist.is_initialized():
            for buffer in (self.codebook, getattr(self, "embed_sum", None)):
                if buffer is not None:
                    dist.broadcast(buffer.data, src=0)
