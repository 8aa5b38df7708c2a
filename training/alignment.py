"""The ``<EOS>`` alignment term: pulls a medium's ``<EOS>`` state towards its caption's.

NExT-OMNI retrieves across modalities with the final hidden state at ``<EOS>`` (the paper
fine-tunes that retrieval on M-BEIR). The DFM and AR objectives never compare two
sequences, so nothing in them places an image's ``<EOS>`` state near its caption's: the
demo's retrieval stayed at chance while its captions and transcripts were learned. This
term embeds, for each row of an ``X2text`` micro-batch, the medium alone
(``<BOS> <BO*> ids <EO*> <EOS>``) and its text alone (``<BOS> text <EOS>``), the two
sequences ``evaluation/tasks/retrieval.py`` ranks, and scores the batch's similarity matrix
with a symmetric InfoNCE (CLIP, Radford et al. 2021): each medium against every text of the
micro-batch and each text against every medium. Rows with the same text (two images of a
seven captioned alike) are positives of each other, so a duplicate caption is no negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenization.vocab import VocabLayout
from training.micro_batch import MicroBatch

PAIRED_BUCKETS = frozenset({"image2text", "audio2text", "video2text"})


@dataclass
class Pairs:
    """One micro-batch's rows as (medium alone, text alone): ``media`` / ``texts`` Long[B, L]
    right padded, ``media_mask`` / ``text_mask`` Bool[B, L] (True = real), ``positives``
    Bool[B, B] (row j's text answers row i's medium)."""

    media: Tensor
    media_mask: Tensor
    texts: Tensor
    text_mask: Tensor
    positives: Tensor


def pairs_of(batch: MicroBatch, layout: VocabLayout) -> Pairs | None:
    """The (medium, text) pairs of an ``X2text`` micro-batch; None for any other bucket.

    A row's text is its response up to its first ``<EOS>`` (the DGS ``<PAD>`` tail and the
    batch padding dropped); a response without one is closed with ``<EOS>``.
    """
    if batch.bucket not in PAIRED_BUCKETS:
        return None
    bos, eos = layout.special_id("<BOS>"), layout.special_id("<EOS>")
    media, texts = [], []
    lengths = batch.instruction_lengths.tolist()
    for row, mask, n in zip(batch.ids, batch.attention_mask, lengths, strict=True):
        response = row[n:][mask[n:]]
        ends = (response == eos).nonzero().flatten()
        text = (
            response[: int(ends[0]) + 1]
            if len(ends)
            else torch.cat([response, row.new_tensor([eos])])
        )
        media.append(torch.cat([row[:n], row.new_tensor([eos])]))
        texts.append(torch.cat([row.new_tensor([bos]), text]))
    keys = [tuple(t.tolist()) for t in texts]
    positives = torch.tensor([[a == b for b in keys] for a in keys], device=batch.ids.device)
    media_ids, media_mask = _right_padded(media, layout.special_id("<PAD>"))
    text_ids, text_mask = _right_padded(texts, layout.special_id("<PAD>"))
    return Pairs(media_ids, media_mask, text_ids, text_mask, positives)


def _right_padded(rows: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = rows[0].new_full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def contrastive_sum(media: Tensor, texts: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE, summed over rows: Float[].

    ``media``, ``texts``: Float[B, H] ``<EOS>`` states (normalised here); ``positives``:
    Bool[B, B] with a true diagonal. Per row and direction: ``-log`` of the softmax mass on
    its positives; the two directions are averaged, so a row adds at most one term's worth.
    """
    similarity = F.normalize(media.float(), dim=-1) @ F.normalize(texts.float(), dim=-1).T
    logits = similarity / temperature
    outside = torch.finfo(logits.dtype).min

    def direction(scores: Tensor, answers: Tensor) -> Tensor:
        kept = scores.masked_fill(~answers, outside).logsumexp(-1)
        return (scores.logsumexp(-1) - kept).sum()

    return (direction(logits, positives) + direction(logits.T, positives.T)) / 2
