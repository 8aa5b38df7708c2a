"""Retrieval with the ``<EOS>`` feature: text <-> image, text <-> audio, text <-> video.

NExT-OMNI's probe of unified representations: the final hidden state at ``<EOS>`` of a
sequence is its embedding. From each ``X2text`` eval sample the medium alone
(``<BOS> <BO*> ids <EO*> <EOS>``) and the text alone (``<BOS> text <EOS>``) are embedded,
fully bidirectional; cosine similarity ranks every candidate for every query, in both
directions. Recall@1/5/10 and the median rank, each with its chance level.

An eval split may hold the same medium twice (one image, two captions) or the same
caption twice: every pair that shares the query's medium or its caption is a correct
answer (``pair_positives``), so a duplicate is not scored as a miss. Where samples carry a
class (``meta.json`` ``label``, e.g. the digit), every pair of the query's class is a
correct answer too: an image of a seven retrieves any caption of a seven, which is
retrieval among the class captions, with chance at about 1 / classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.anytoany import pad_rows
from evaluation.metrics import retrieval_metrics
from evaluation.recognisers import label_of
from evaluation.tasks.base import TaskContext, TaskResult, batches, split_sample

PAIRS = {"image": "image2text", "audio": "audio2text", "video": "video2text"}
BUCKETS = tuple(PAIRS.values())


@torch.inference_mode()
def embed(context: TaskContext, rows: list[Tensor]) -> Tensor:
    """Float[N, H] unit-norm ``<EOS>`` embeddings of Long[L_i] sequences."""
    model = context.loaded.model
    out = []
    for chunk in batches(rows, context.suite.batch_size):
        ids, mask = pad_rows(chunk, model.layout.special_id("<PAD>"))
        mask = None if mask is None else mask.to(model.device)
        out.append(model.eos_embedding(ids.to(model.device), mask).float())
    return F.normalize(torch.cat(out), dim=-1).cpu()


def same_rows(rows: list[Tensor]) -> Tensor:
    """Bool[N, N]: whether row i and row j hold the same ids."""
    groups: dict[tuple[int, ...], int] = {}
    group = torch.tensor([groups.setdefault(tuple(row.tolist()), len(groups)) for row in rows])
    return group[:, None] == group[None, :]


def pair_positives(media: list[Tensor], texts: list[Tensor]) -> Tensor:
    """Bool[N, N] for N (medium, text) eval pairs: pair j answers a query from pair i when
    it has the same medium or the same text (symmetric, so it serves both directions)."""
    return same_rows(media) | same_rows(texts)


def label_positives(samples: list) -> Tensor:
    """Bool[N, N]: whether samples i and j carry the same class label (no label: never)."""
    labels = [label_of(sample) for sample in samples]
    return torch.tensor(
        [[a is not None and a == b for b in labels] for a in labels], dtype=torch.bool
    )


def run(context: TaskContext) -> TaskResult:
    """Both directions for every medium with at least two eval pairs."""
    layout = context.loaded.model.layout
    bos, eos = (torch.tensor([layout.special_id(t)]) for t in ("<BOS>", "<EOS>"))
    result = TaskResult()
    for medium, bucket in PAIRS.items():
        samples = context.samples.get(bucket, [])
        if len(samples) < 2:
            result.notes.append(f"retrieval text<->{medium}: {len(samples)} eval pairs, skipped")
            continue
        media, texts = [], []
        for sample in samples:
            instruction, response = split_sample(sample)
            media.append(torch.cat([instruction, eos]))  # <BOS> <BO*> ids <EO*> <EOS>
            texts.append(torch.cat([bos, response]))  # <BOS> text <EOS>
        similarity = embed(context, texts) @ embed(context, media).T  # (text, medium)
        positives = pair_positives(media, texts) | label_positives(samples)
        for name, matrix in ((f"text2{medium}", similarity), (f"{medium}2text", similarity.T)):
            for key, value in retrieval_metrics(matrix, positives).items():
                result.metrics[f"retrieval/{name}/{key}"] = value
            result.headline += [f"retrieval/{name}/r1", f"retrieval/{name}/median_rank"]
        result.metrics[f"retrieval/text2{medium}/pairs"] = float(len(samples))
    return result
