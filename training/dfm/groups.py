"""Head groups: the partition of the unified vocabulary that the model's heads predict.

    text  = [0, T + S)          text BPE ids and the special tokens (the LM head's range,
                                so <EOS>, <PAD>, <BOI>, ... are predicted by the text head)
    image = [T + S, T + S + I)  the image codebook block
    audio = [T + S + I, size)   the audio codebook block

Every probability path corrupts a token within its own group (a uniform draw, a metric
neighbour), so a local id of group ``g`` is ``unified - start[g]`` and the head of ``g``
predicts it. ``<MASK>`` is a text-group id, but in the masked path it means "masked".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenization.vocab import VocabLayout


@dataclass(frozen=True)
class VocabGroups:
    """Names, first unified id and size of each head group, in vocabulary order."""

    names: tuple[str, ...]
    start: dict[str, int]
    size: dict[str, int]

    @classmethod
    def from_layout(cls, layout: VocabLayout) -> VocabGroups:
        offsets, sizes = layout.offsets, layout.sizes
        return cls(
            names=("text", "image", "audio"),
            start={"text": 0, "image": offsets["image"], "audio": offsets["audio"]},
            size={
                "text": sizes["text"] + sizes["special"],
                "image": sizes["image"],
                "audio": sizes["audio"],
            },
        )

    @property
    def total(self) -> int:
        """Size of the unified vocabulary."""
        return sum(self.size.values())

    def index(self, name: str) -> int:
        """Position of group ``name`` in :attr:`names` (the value :meth:`group_of` returns)."""
        return self.names.index(name)

    def group_of(self, ids: Tensor) -> Tensor:
        """Long tensor of ``ids``' shape: the group index (0 text, 1 image, 2 audio) of each id.

        Ids are not range-checked (that would synchronise a GPU every call); ids of the
        unified vocabulary are assumed.
        """
        bounds = torch.tensor([self.start[n] for n in self.names[1:]], device=ids.device)
        return torch.bucketize(ids, bounds, right=True)

    def starts_of(self, group_index: Tensor) -> Tensor:
        """First unified id of each entry's group (``group_index`` from :meth:`group_of`)."""
        starts = torch.tensor([self.start[n] for n in self.names], device=group_index.device)
        return starts[group_index]

    def sizes_of(self, group_index: Tensor) -> Tensor:
        """Vocabulary size of each entry's group (``group_index`` from :meth:`group_of`)."""
        sizes = torch.tensor([self.size[n] for n in self.names], device=group_index.device)
        return sizes[group_index]
