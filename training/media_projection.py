"""How an image or audio id enters the backbone: its frozen codebook vector, projected.

NExT-OMNI does not learn embeddings for media ids: the id's vector in the tokenizer's
codebook (frozen) goes through one light projection per modality to the hidden size.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn


class MediaProjection(nn.Module):
    """Codebook vector (d) -> hidden size (H): ``linear`` or a two-layer GELU ``mlp``.

    Inputs are divided by the codebook's RMS and the last layer is initialised so that
    media tokens enter the backbone at about the scale of the text embeddings
    (``target_std``), whatever scale the tokenizer's codebook has.
    """

    def __init__(
        self, codebook: Tensor, hidden: int, kind: Literal["linear", "mlp"], target_std: float
    ) -> None:
        super().__init__()
        d = codebook.shape[1]
        self.register_buffer("rms", codebook.detach().float().pow(2).mean().sqrt().clamp_min(1e-6))
        layers: list[nn.Module] = [nn.Linear(d, hidden)]
        if kind == "mlp":
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.net = nn.Sequential(*layers)
        last = self.net[-1]
        nn.init.normal_(last.weight, std=target_std / math.sqrt(last.in_features))
        nn.init.zeros_(last.bias)

    def forward(self, vectors: Tensor) -> Tensor:
        """(..., d) codebook vectors -> (..., H)."""
        return self.net(vectors / self.rms)
