"""Understanding: image and video captioning (BLEU) and ASR (WER) with the run's sampler.

The instruction of each ``X2text`` eval sample (``<BOS> <BO*> ids <EO*>``) is given to
:func:`evaluation.anytoany.generate_batch`: DGS picks the text canvas, the suite's sampler
(by default blocks of 32, 4 tokens a step, the active cache) denoises it (greedy KV-cached
decoding for the AR baseline). Also measured: how often the canvas DGS picks lies within
one block of the reference response padded to the block (for AR, the length it stopped at).
"""

from __future__ import annotations

import torch

from evaluation.anytoany import generate_batch
from evaluation.metrics import bleu, wer, within_one_block
from evaluation.tasks.base import TaskContext, TaskResult, batches, split_sample

# name -> (bucket, metric); captions score BLEU-4, transcripts WER.
TARGETS = {
    "image_caption": ("image2text", "bleu"),
    "video_caption": ("video2text", "bleu"),
    "asr": ("audio2text", "wer"),
}
BUCKETS = tuple(bucket for bucket, _ in TARGETS.values())
SCORES = {"bleu": bleu, "wer": wer}


def run(context: TaskContext) -> TaskResult:
    """Generate a text for every eval sample of each bucket and score it."""
    loaded, suite = context.loaded, context.suite
    text = loaded.tokenizers.text
    result = TaskResult()
    for name, (bucket, metric) in TARGETS.items():
        samples = context.samples.get(bucket, [])
        if not samples:
            result.notes.append(f"{name}: no eval samples in {bucket}, skipped")
            continue
        predictions, references, chosen, reference_lengths = [], [], [], []
        outputs = result.outputs.setdefault(name, [])
        for chunk in batches(samples, suite.batch_size):
            parts = [split_sample(s) for s in chunk]
            out = generate_batch(
                loaded, [p[0] for p in parts], "text", context.sampler, seed=suite.seed
            )
            predictions += text.decode_batch([r.tolist() for r in out.responses])
            outputs += out.responses
            for _, response in parts:
                references.append(text.decode(response[response < text.vocab_size].tolist()))
                reference_lengths.append(len(response))  # with its <EOS>
            if out.canvas_lengths is not None:
                chosen += out.canvas_lengths.tolist()
            else:  # AR: the length it generated, with the <EOS> it stopped at
                chosen += [len(r) + 1 for r in out.responses]
        prefix = f"understanding/{name}"
        result.metrics[f"{prefix}/{metric}"] = SCORES[metric](predictions, references)
        result.metrics[f"{prefix}/length_within_block"] = within_one_block(
            torch.tensor(chosen), torch.tensor(reference_lengths), context.dgs_block
        )
        result.metrics[f"{prefix}/samples"] = float(len(samples))
        result.headline += [f"{prefix}/{metric}", f"{prefix}/length_within_block"]
        shown = zip(predictions[: suite.artifacts], references[: suite.artifacts], strict=True)
        for index, (prediction, reference) in enumerate(shown):
            body = f"reference: {reference}\ngenerated: {prediction}\n"
            result.artifacts[f"samples/{name}-{index}.txt"] = body.encode()
    return result
