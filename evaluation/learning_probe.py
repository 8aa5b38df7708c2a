"""A seeded image -> caption run on the UCI handwritten digits that tells a model that learns
from one that cannot (a broken mask, misaligned labels, a wrong loss normalisation).

A slice of scikit-learn's copy of the digits (the 8x8 scans ``omni examples digits``
upscales), each pixel one of four grey codes instead of the VQ tokenizer's (whose warm-up
alone would take the budget), captioned "the digit <word>". The model is trained with the
real :class:`~training.objective.Objective` (DFM on the masked path, or the AR baseline) and
read back through the real samplers: the score is the fraction of held-out images whose
generated caption names their digit (chance 10%). ``tests/training/test_learning.py`` and
``benchmarks/time_to_accuracy.py`` run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

from evaluation.config import quick_sampler
from tokenization.token_samples import TokenSample
from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.dfm import PathConfig, build_path
from training.generation import generate
from training.micro_batch import collate
from training.model import OmniModel
from training.model_config import load_model_config
from training.objective import Objective

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = (*WORDS, "the", "digit")
LAYOUT = VocabLayout(text_size=len(VOCAB), image_size=4, audio_size=4)
BLOCK = 8  # the DGS block: responses padded to 8
TRAIN, HELD_OUT = 1500, 200


@dataclass
class ProbePoint:
    """The held-out score after ``step`` optimizer steps (``seconds`` of training)."""

    step: int
    seconds: float
    accuracy: float


def digit_samples(labels: np.ndarray, images: np.ndarray) -> list[TokenSample]:
    """``<BOS> <BOI> 64 pixel codes <EOI>`` then ``the digit <word> <EOS>``, one per image."""
    special = LAYOUT.special_id
    out = []
    for index, (label, image) in enumerate(zip(labels, images, strict=True)):
        instruction = [special("<BOS>"), special("<BOI>"),
                       *LAYOUT.to_unified("image", image).tolist(), special("<EOI>")]  # fmt: skip
        response = [VOCAB.index("the"), VOCAB.index("digit"), int(label), special("<EOS>")]
        tokens = torch.tensor(instruction + response)
        out.append(TokenSample(str(index), tokens, torch.zeros_like(tokens, dtype=torch.uint8),
                               {"instruction_length": len(instruction)}))  # fmt: skip
    return out


def run_probe(
    objective: str = "dfm",
    steps: int = 300,
    shuffle_labels: bool = False,
    every: int | None = None,
    stop_at: float | None = None,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    response_positions: int | None = None,
) -> list[ProbePoint]:
    """Train ``tiny`` for up to ``steps`` steps; score every ``every`` steps (None: at the
    end only) and stop early once the score reaches ``stop_at``. ``response_positions``
    overrides the preset's (0 = rotary positions only)."""
    torch.manual_seed(seed)
    digits = load_digits()
    images = np.minimum(digits.images * 4 / 17, 3).astype(np.int64).reshape(-1, 64)
    labels = digits.target.copy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    train_labels = rng.permutation(labels) if shuffle_labels else labels
    train = digit_samples(train_labels[order[:TRAIN]], images[order[:TRAIN]])
    held_out = order[TRAIN : TRAIN + HELD_OUT]
    prompts = torch.stack(
        [s.tokens[:67] for s in digit_samples(labels[held_out], images[held_out])]
    )
    codebooks = {"image": torch.linspace(0, 1, 4)[:, None].repeat(1, 4), "audio": torch.eye(4)}
    config = load_model_config("tiny")
    if response_positions is not None:
        config = config.model_copy(update={"response_positions": response_positions})
    model = OmniModel(config, LAYOUT, codebooks)
    path = build_path(PathConfig(), LAYOUT) if objective == "dfm" else None
    loss_of = Objective(model, objective, path, "cross_entropy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    score = _scorer(model, objective, path, prompts, labels[held_out])
    points, trained = [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        picked = torch.randint(0, len(train), (batch,), generator=generator).tolist()
        pad = LAYOUT.special_id("<PAD>")
        micro = collate([train[i] for i in picked], "image2text", pad,
                        BLOCK if objective == "dfm" else None)  # fmt: skip
        prepared = loss_of.prepare(micro, generator)
        sums, _, _ = loss_of(prepared.inputs, micro.attention_mask, micro.instruction_lengths,
                             prepared.targets, prepared.scored, prepared.t)  # fmt: skip
        optimizer.zero_grad()
        (sums["ce"] / prepared.counts["ce"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the trainer does
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 20)  # the trainer's linear warm-up
        optimizer.step()
        trained += time.perf_counter() - started
        if step == steps or (every and step % every == 0):
            points.append(ProbePoint(step, trained, score()))
            if stop_at is not None and points[-1].accuracy >= stop_at:
                break
    return points


def _scorer(
    model: OmniModel,
    objective: str,
    path: object,
    prompts: torch.Tensor,
    labels: np.ndarray,
) -> Callable[[], float]:
    sampler = quick_sampler().model_copy(
        update={"block_size": BLOCK, "max_length": BLOCK, "tau": None, "tokens_per_step": 1}
    )

    @torch.no_grad()
    def score() -> float:
        model.eval()
        if objective == "dfm":
            rows = generate(model, prompts, "text", path, sampler, None, None,
                            torch.Generator().manual_seed(0))  # fmt: skip
        else:
            rows = ar_generate(model, prompts, BLOCK, "text", LAYOUT.special_id("<EOS>"))
        model.train()
        named = [int(label) in row.tolist() for label, row in zip(labels, rows, strict=True)]
        return float(np.mean(named))

    return score
