"""Vector quantisation: nearest-code lookup with the straight-through estimator.

``z_q = argmin_{c in C} ||z - c||_2`` (NExT-OMNI, eq. for L_VQ; van den Oord et al. 2017,
"Neural Discrete Representation Learning"). Gradients pass straight through
(``z + sg(z_q - z)``); the encoder is pulled towards its code by the commitment term
``beta * ||z - sg(z_q)||^2``. The codebook is either learned by the codebook term
``||sg(z) - z_q||^2`` or, by default, updated as an exponential moving average of the
encoder outputs assigned to each code (Razavi et al. 2019, VQ-VAE-2), which is more stable.
Codes whose EMA usage falls below a threshold are restarted from random encoder outputs
so the codebook does not collapse.

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
from pydantic import Field, model_validator
from torch import nn

from infra.config import Section


class QuantizerConfig(Section):
    """Codebook shape and update rule."""

    codebook_size: int = Field(512, gt=1, description="codes per (sub-)codebook")
    dim: int = Field(64, gt=0, description="vector size; split into num_codebooks parts")
    num_codebooks: int = Field(1, ge=1, description="K sub-codebooks per position")
    commitment: float = Field(0.25, ge=0, description="beta of the commitment term")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="0 = codebook learned by gradient")
    dead_code_threshold: float = Field(
        0.03, ge=0, description="EMA assignments per step below which a code is restarted"
    )

    @model_validator(mode="after")
    def _divisible(self) -> QuantizerConfig:
        if self.dim % self.num_codebooks:
            raise ValueError(f"dim={self.dim} must be divisible by num_codebooks")
        return self


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
