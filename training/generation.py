"""What to generate: response canvases for any target, dynamic length, and ``generate``.

* Text: the dynamic-length strategy (DGS) of NExT-OMNI (ICLR 2026). Training pads every
  response with ``<PAD>`` to a multiple of the block size (:func:`pad_response_to_block`),
  so a fully noised canvas of ``L`` positions is long enough exactly when the model puts
  ``<EOS>`` or ``<PAD>`` at its last position. :func:`choose_lengths` starts at one block
  and grows the canvas by a block while ``p(<EOS>) + p(<PAD>)`` at its tail stays below
  ``eos_threshold``, up to ``max_length``; the denoising then runs over that length and the
  text is cut at the first ``<EOS>``.
* Image / audio: ``<BOI> + N image positions + <EOI> <EOS>`` (``<BOA>``/``<EOA>`` for
  audio; ``N`` from the modality's tokenizer), the structure tokens fixed, only the media
  positions denoised, each by its modality's head.

:func:`sample_response` runs a sampler of :mod:`training.sampling` over such a canvas for
any :class:`~training.sampling.Predictor`; :func:`generate` does it for an ``OmniModel``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tokenization.sequences import MEDIA_MARKERS
from training.dfm import MaskedPath, ProbPath
from training.model import OmniModel
from training.model_predictor import ModelPredictor
from training.sampling import (
    FIXED,
    Canvas,
    Predictor,
    SamplerConfig,
    Vocabulary,
    confidence_unmask,
    euler_sample,
    group_probabilities,
    prior_sample,
)

MEDIA_TARGETS = ("image", "audio")  # media responses with a head group of their own


def padded_length(length: int, block_size: int) -> int:
    """The smallest multiple of ``block_size`` that holds ``length`` (>= 1) positions."""
    return max(1, -(-length // block_size)) * block_size


def pad_response_to_block(
    tokens: np.ndarray, instruction_length: int, pad_id: int, block_size: int = 32
) -> np.ndarray:
    """(L,) sequence -> the same sequence with ``<PAD>`` appended so that its response
    (``tokens[instruction_length:]``, ending in ``<EOS>``) fills a multiple of
    ``block_size`` positions. Training on such responses teaches the model what
    :func:`choose_lengths` asks of it: ``<PAD>`` after ``<EOS>`` up to the block boundary."""
    response = len(tokens) - instruction_length
    if response < 1:
        raise ValueError(f"no response: {len(tokens)} tokens, instruction {instruction_length}")
    extra = padded_length(response, block_size) - response
    return np.concatenate([tokens, np.full(extra, pad_id, dtype=tokens.dtype)])


def text_canvas(lengths: Tensor, vocab: Vocabulary) -> Canvas:
    """A text canvas of ``max(lengths)`` positions: row ``b`` has ``lengths[b]`` free
    ``<MASK>`` positions on the text head, then fixed ``<PAD>`` (what the model was trained
    to see after a shorter response)."""
    width = int(lengths.max())
    positions = torch.arange(width, device=lengths.device)[None, :]
    free = positions < lengths[:, None]
    ids = torch.where(free, vocab.mask_id, vocab.pad_id)
    group = torch.where(free, vocab.groups.index("text"), FIXED)
    return Canvas(ids, group)


def media_canvas(
    modality: str, tokens: int, batch: int, vocab: Vocabulary, device: torch.device | str = "cpu"
) -> Canvas:
    """``<BO*> + tokens x <MASK> + <EO*> <EOS>`` for ``modality`` "image" or "audio": the
    markers fixed, the media positions free on the modality's head."""
    begin, end = (vocab.layout.special_id(m) for m in MEDIA_MARKERS[modality])
    ids = torch.tensor([begin, *[vocab.mask_id] * tokens, end, vocab.eos_id], device=device)
    group = torch.full_like(ids, FIXED)
    group[1 : 1 + tokens] = vocab.groups.index(modality)
    return Canvas(ids.expand(batch, -1).clone(), group.expand(batch, -1).clone())


def choose_lengths(
    predictor: Predictor,
    path: ProbPath,
    batch: int,
    vocab: Vocabulary,
    config: SamplerConfig,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DGS: Long[B] text canvas length per row, a multiple of ``block_size``.

    Probe canvases of ``L = block, 2 block, ...`` positions drawn from ``p_0``; a row takes
    the first ``L`` at which ``p(<EOS>) + p(<PAD>)`` at position ``L - 1`` reaches
    ``eos_threshold`` (the response fits), or ``max_length``. One predictor call per
    probe, logits at one position per row.
    """
    lengths = torch.full((batch,), config.max_length, device=device)
    decided = torch.zeros(batch, dtype=torch.bool, device=device)
    text = vocab.groups.index("text")
    for length in range(config.block_size, config.max_length + 1, config.block_size):
        empty = Canvas(
            torch.full((batch, length), vocab.mask_id, device=device),
            torch.full((batch, length), text, device=device),
        )
        probe = prior_sample(path, empty, vocab, generator)
        tail = torch.zeros_like(probe.ids, dtype=torch.bool)
        tail[:, -1] = True
        probs = group_probabilities(predictor(probe.ids, {"text": tail})["text"], "text", vocab)
        done = probs[:, vocab.eos_id] + probs[:, vocab.pad_id] >= config.eos_threshold
        lengths = torch.where(done & ~decided, length, lengths)
        decided |= done
        if decided.all():
            break
    return lengths


def cut_at_eos(ids: Tensor, eos_id: int) -> list[Tensor]:
    """Each row of Long[B, R] up to (not including) its first ``<EOS>``; whole if none."""
    rows = []
    for row in ids:
        ends = (row == eos_id).nonzero()
        rows.append(row[: int(ends[0])] if len(ends) else row)
    return rows


def response_canvas(
    target: str,
    predictor: Predictor,
    path: ProbPath,
    batch: int,
    vocab: Vocabulary,
    config: SamplerConfig,
    media_tokens: int | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Canvas:
    """The empty response canvas for ``target``: "text" (length chosen by DGS), "image" or
    "audio" (``media_tokens`` positions between the markers)."""
    if target == "text":
        lengths = choose_lengths(predictor, path, batch, vocab, config, device, generator)
        return text_canvas(lengths, vocab)
    if target not in MEDIA_TARGETS:
        raise ValueError(f"unknown target {target!r}: text, {', '.join(MEDIA_TARGETS)}")
    if media_tokens is None:
        raise ValueError(f"a {target} response needs media_tokens (its tokenizer's count)")
    return media_canvas(target, media_tokens, batch, vocab, device)


def sample_response(
    predictor: Predictor,
    path: ProbPath,
    target: str,
    batch: int,
    vocab: Vocabulary,
    config: SamplerConfig,
    media_tokens: int | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Generate ``batch`` responses of modality ``target``; each is cut at its first
    ``<EOS>`` (text: the text ids; media: ``<BO*> ids <EO*>``)."""
    canvas = response_canvas(
        target, predictor, path, batch, vocab, config, media_tokens, device, generator
    )
    canvas = prior_sample(path, canvas, vocab, generator)
    if config.method == "confidence":
        if not isinstance(path, MaskedPath):
            raise ValueError(
                f"confidence unmasking needs the masked path, not {type(path).__name__}"
            )
        canvas = confidence_unmask(predictor, canvas, vocab, config, generator)
    else:
        canvas = euler_sample(
            predictor, path, canvas, vocab, config.steps, config.temperature, generator
        )
    return cut_at_eos(canvas.ids, vocab.eos_id)


@torch.inference_mode()
def generate(
    model: OmniModel,
    instruction: Tensor,
    target: str,
    path: ProbPath,
    config: SamplerConfig,
    instruction_mask: Tensor | None = None,
    media_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Any-to-any generation: one ``target`` ("text", "image", "audio") response per row of
    ``instruction`` (Long[B, P], right padding per ``instruction_mask``), sampled with
    ``config`` along ``path`` (the path the model was trained on). Responses are unified
    ids cut at their first ``<EOS>``; ``media_tokens``: positions of an image/audio
    response (its tokenizer's ``tokens_per_image`` or clip length)."""
    predictor = ModelPredictor(model, instruction, instruction_mask, config.cache)
    vocab = Vocabulary(model.layout, model.groups)
    batch = instruction.shape[0]
    return sample_response(
        predictor, path, target, batch, vocab, config, media_tokens, instruction.device, generator
    )
