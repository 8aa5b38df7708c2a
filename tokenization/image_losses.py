"""Losses of the image tokenizer warm-up (NExT-OMNI, "Reconstruction-Augmented Unified
Representation"): ``L_total = L_rec + L_sem`` with

- ``L_rec = L_R + L_VQ + L_G``: pixel reconstruction ``L_R = |x - x_hat|_1 + |x - x_hat|_2^2``,
  the quantiser's ``L_VQ`` (:mod:`tokenization.quantizer`) and the adversarial ``L_G`` of a
  PatchGAN discriminator (Isola et al. 2017; hinge form as in VQGAN, Esser et al. 2021);
- ``L_sem = L_constra``: CLIP's symmetric InfoNCE (Radford et al. 2021) between the pooled
  image latents and caption features from a small text encoder trained alongside.

The reconstruction and GAN terms keep fine detail in the codes, the contrastive term puts
sentence-level semantics into the same encoder, so one representation serves understanding,
generation and retrieval.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, 3, H, W) in [0, 1] -> real/fake logits per patch (B, 1, H / 2^L, W / 2^L).

    ``layers`` stride-2 convs (width doubling, capped at 8x), GroupNorm rather than BatchNorm
    so that the output does not depend on how real and fake images are batched.
    """

    def __init__(self, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        previous = width
        for level in range(1, layers):
            current = width * min(2**level, 8)
            blocks += [
                nn.Conv2d(previous, current, 4, stride=2, padding=1),
                nn.GroupNorm(math.gcd(32, max(1, current // 4)), current),
                nn.LeakyReLU(0.2),
            ]
            previous = current
        blocks.append(nn.Conv2d(previous, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * 2 - 1)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_D = E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]`` (scalar)."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``L_G = -E[D(x_hat)]`` (scalar): the decoder is rewarded for fooling D."""
    return -fake_logits.mean()


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``L_constra``: symmetric InfoNCE over a batch of B matched pairs (scalar).

    With unit-normalised ``u_i`` (image, (B, D)) and ``v_j`` (text, (B, D)) and logits
    ``s_ij = u_i . v_j / tau``: ``L = (CE(s, diag) + CE(s^T, diag)) / 2``, i.e. each image
    must pick its own caption among the batch, and each caption its own image.
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = image @ text.T / temperature  # (B, B)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CaptionEncoder(nn.Module):
    """Caption BPE ids -> sentence features (B, out_dim), the text side of L_sem.

    Token + position embeddings, a pre-norm transformer encoder (bidirectional), a mean over
    the real tokens (padding masked out of attention and of the mean), then a linear head.
    Captions longer than ``max_tokens`` are truncated.
    """

    def __init__(
        self, vocab_size: int, width: int, layers: int, heads: int, out_dim: int, max_tokens: int
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_tokens, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, captions: list[list[int]]) -> torch.Tensor:
        """``captions``: B lists of token ids in [0, vocab_size), each non-empty."""
        if not captions or any(not ids for ids in captions):
            raise ValueError("every caption needs at least one token")
        if any(i < 0 or i >= self.vocab_size for ids in captions for i in ids):
            raise ValueError(f"caption token ids must lie in [0, {self.vocab_size})")
        rows = [ids[: self.max_tokens] for ids in captions]
        length = max(len(ids) for ids in rows)
        padded = torch.zeros(len(rows), length, dtype=torch.long)  # built on the CPU, moved once
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for row, ids in enumerate(rows):
            padded[row, : len(ids)] = torch.tensor(ids)
            valid[row, : len(ids)] = True
        device = self.tokens.weight.device
        padded, valid = padded.to(device), valid.to(device)
        positions = torch.arange(length, device=device)
        hidden = self.tokens(padded) + self.positions(positions)  # (B, T, width)
        hidden = self.norm(self.encoder(hidden, src_key_padding_mask=~valid))
        weights = valid.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, width)
        return self.head(pooled)
