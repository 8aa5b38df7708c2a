"""Speed: response tokens per second of the sampler at the suite's settings.

A fixed amount of work so checkpoints compare: one batch of ``text2image`` instructions
(image canvases have a fixed length) or, without such samples, text responses of the
captioning instructions. Timed after one warm-up call (allocator, kernels, first-call
caches), synchronised on GPU.
"""

from __future__ import annotations

import time

import torch

from evaluation.anytoany import generate_batch
from evaluation.tasks.base import TaskContext, TaskResult, split_sample

SOURCES = (("text2image", "image"), ("image2text", "text"), ("audio2text", "text"))
BUCKETS = tuple(bucket for bucket, _ in SOURCES)


def run(context: TaskContext) -> TaskResult:
    """Tokens/s of one batch of the first source bucket that has samples."""
    loaded, suite = context.loaded, context.suite
    result = TaskResult()
    found = [(b, t) for b, t in SOURCES if context.samples.get(b)]
    if not found:
        result.notes.append("speed: no samples to time, skipped")
        return result
    bucket, target = found[0]
    samples = context.samples[bucket][: suite.batch_size]
    instructions = [split_sample(s)[0] for s in samples]
    tokens = loaded.tokenizers.image.tokens_per_image if target == "image" else None
    generate_batch(loaded, instructions[:1], target, context.sampler, tokens, suite.seed)
    _synchronise(loaded.device)
    started = time.perf_counter()
    out = generate_batch(loaded, instructions, target, context.sampler, tokens, suite.seed)
    _synchronise(loaded.device)
    seconds = time.perf_counter() - started
    produced = sum(len(r) for r in out.responses)
    result.metrics["speed/tokens_per_s"] = produced / max(seconds, 1e-9)
    result.metrics["speed/seconds"] = seconds
    result.headline.append("speed/tokens_per_s")
    result.notes.append(f"speed: {produced} {target} tokens of {bucket} in {seconds:.2f} s")
    return result


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
