"""Understanding: image and video captioning (BLEU) and ASR (WER) with the run's sampler.

Beside BLEU / WER: exact match (no partial credit), and where the samples carry a class
(``evaluation/recognisers.py``) the share of generated texts that a text recogniser fitted
on the training captions reads as the sample's class ("the digit 7" for "a handwritten
seven"), with the recogniser's score on the references (ceiling), the chance level and the
always-the-majority-class baseline beside it.

The instruction of each ``X2text`` eval sample (``<BOS> <BO*> ids <EO*>``) is given to
:func:`evaluation.anytoany.generate_batch`: DGS picks the text canvas, the suite's sampler
(by default blocks of 32, 4 tokens a step, the active cache) denoises it (greedy KV-cached
decoding for the AR baseline). Also measured: how often the canvas DGS picks lies within
one block of the reference response padded to the block (for AR, the length it stopped at).
"""

from __future__ import annotations

import torch

from evaluation.anytoany import generate_batch
from evaluation.metrics import bleu, exact_match, label_scores, wer, within_one_block
from evaluation.recognisers import span_ids
from evaluation.sample_grid import Example, Media
from evaluation.tasks.base import EXAMPLES, TaskContext, TaskResult, batches, split_sample
from tokenization.token_samples import TokenSample

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
        result.metrics[f"{prefix}/exact_match"] = exact_match(predictions, references)
        result.headline.append(f"{prefix}/exact_match")
        _recognise(context, result, prefix, samples, predictions, references)
        result.metrics[f"{prefix}/length_within_block"] = within_one_block(
            torch.tensor(chosen), torch.tensor(reference_lengths), context.dgs_block
        )
        result.metrics[f"{prefix}/samples"] = float(len(samples))
        result.headline += [f"{prefix}/{metric}", f"{prefix}/length_within_block"]
        for index in range(min(EXAMPLES, len(samples))):
            prompt = _decoded_input(context, samples[index])
            result.examples.append(Example(name, prompt, references[index], predictions[index]))
        shown = zip(predictions[: suite.artifacts], references[: suite.artifacts], strict=True)
        for index, (prediction, reference) in enumerate(shown):
            body = f"reference: {reference}\ngenerated: {prediction}\n"
            result.artifacts[f"samples/{name}-{index}.txt"] = body.encode()
    return result


def _recognise(
    context: TaskContext,
    result: TaskResult,
    prefix: str,
    samples: list,
    predictions: list[str],
    references: list[str],
) -> None:
    """``{prefix}/label_accuracy`` and its ceiling, chance and majority baseline."""
    judge = context.recogniser("text", result, prefix)
    if judge is None:
        return
    labelled, labels = judge.judged(samples, prefix, result.notes)
    if not labelled:
        return
    scores = label_scores(
        judge.predict([predictions[i] for i in labelled]), labels, judge.classes, judge.majority
    )
    ceiling = judge.accuracy([references[i] for i in labelled], labels)
    result.metrics[f"{prefix}/label_accuracy"] = scores["accuracy"]
    result.metrics[f"{prefix}/label_ceiling"] = ceiling
    result.metrics[f"{prefix}/label_chance"] = scores["chance"]
    result.metrics[f"{prefix}/label_majority"] = scores["majority"]
    result.headline.append(f"{prefix}/label_accuracy")


def _decoded_input(context: TaskContext, sample: TokenSample) -> Media:
    """The medium of an ``X2text`` sample as its tokenizer decodes it (a video: its first
    frame), for the sample grid."""
    tokenizers = context.loaded.tokenizers
    layout = tokenizers.layout
    if (ids := span_ids(sample, "audio", layout)) is not None:
        return tokenizers.audio.decode(ids).cpu()
    for kind in ("image", "video"):
        if (ids := span_ids(sample, kind, layout)) is not None:
            frame = ids[: tokenizers.image.tokens_per_image]
            return tokenizers.image.decode(frame[None])[0].cpu()
    return "(no medium)"
