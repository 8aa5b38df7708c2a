"""One picture per evaluated checkpoint: prompts, references and generations side by side.

Metrics say how often a checkpoint is right; a person also wants to *see* what it makes.
Each task hands a few :class:`Example` s (its first eval samples) to :func:`render`, which
draws one row per task: images as images, mels as spectrograms, texts as captions under
them. The child run stores it as ``grids/samples.png``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display on servers and in cron
from matplotlib import pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

Media = Tensor | str  # Float[3, H, W] image in [0, 1], Float[n_mels, F] log-mel, or a text


@dataclass
class Example:
    """One eval sample of one task: what the model was given, what it should have made,
    and what it made."""

    task: str
    prompt: Media
    reference: Media
    generated: Media


def _short(text: str, width: int = 28) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 1] + "…"


def _draw(axis: plt.Axes, media: Media) -> None:
    axis.set_xticks([])
    axis.set_yticks([])
    if isinstance(media, str):
        axis.text(0.5, 0.5, _short(media), ha="center", va="center", wrap=True, fontsize=7)
        axis.set_frame_on(False)
    elif media.dim() == 3:  # an image
        axis.imshow(media.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    else:  # a log-mel
        axis.imshow(media.detach().float().cpu().numpy(), origin="lower", aspect="auto")


def render(examples: list[Example], per_task: int = 6) -> bytes:
    """PNG bytes: per task, up to ``per_task`` columns of (prompt, reference, generated)."""
    tasks: dict[str, list[Example]] = {}
    for example in examples:
        tasks.setdefault(example.task, [])
        if len(tasks[example.task]) < per_task:
            tasks[example.task].append(example)
    if not tasks:
        raise ValueError("no examples to draw")
    columns = max(len(items) for items in tasks.values())
    rows = 3 * len(tasks)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.3 * rows), squeeze=False)
    for block, (task, items) in enumerate(tasks.items()):
        for column in range(columns):
            for offset, role in enumerate(("prompt", "reference", "generated")):
                axis = axes[3 * block + offset][column]
                if column >= len(items):
                    axis.set_axis_off()
                    continue
                _draw(axis, getattr(items[column], role))
                if column == 0:
                    axis.set_ylabel(f"{task}\n{role}" if offset == 0 else role, fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()
