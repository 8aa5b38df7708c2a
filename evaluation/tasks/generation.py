"""Generation: text -> image and text -> audio.

Two views of each ``text2X`` eval sample:

* the reference response under the model, scored as in training (``Objective.prepare``:
  the run's path corrupts the response at a seeded ``t``, or the AR shift): token NLL
  (nats per scored token) and accuracy of the argmax at the scored positions, content
  tokens only: the ``<PAD>`` tail DGS appends to DFM responses is easy to predict and an
  AR response has none, so counting it would flatter DFM against AR;
* a generated medium of the reference's length, decoded by the tokenizer's decoder and
  compared with the decoded reference: PSNR and SSIM for images, mel-L1 for audio. A few
  are kept as PNG / WAV, and one grid per evaluation (references above, generated below).
  Where the samples carry a class, the share of generated media that a recogniser fitted
  on the training split's media (``evaluation/recognisers.py``) reads as the prompted class,
  beside the same recogniser on the references (ceiling), chance and the majority baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.anytoany import generate_batch
from evaluation.media_io import grid, mel_to_waveform, png_bytes, wav_bytes
from evaluation.metrics import image_quality, label_scores, mel_l1
from evaluation.recognisers import span_ids
from evaluation.sample_grid import Example
from evaluation.tasks.base import EXAMPLES, TaskContext, TaskResult, batches, split_sample
from tokenization.token_samples import TokenSample
from training.micro_batch import collate
from training.objective import Objective

TARGETS = {"image": "text2image", "audio": "text2audio"}
BUCKETS = tuple(TARGETS.values())


@torch.inference_mode()
def reference_scores(
    context: TaskContext, bucket: str, samples: list[TokenSample]
) -> tuple[float, float]:
    """(mean NLL in nats, accuracy) of the reference responses at the scored positions."""
    loaded = context.loaded
    model = loaded.model
    objective = Objective(model, loaded.objective, loaded.path, "cross_entropy")
    block = context.dgs_block if loaded.objective == "dfm" else None
    generator = torch.Generator(device=model.device).manual_seed(context.suite.seed)
    pad = model.layout.special_id("<PAD>")
    nll, correct, count = 0.0, 0, 0
    for chunk in batches(samples, context.suite.batch_size):
        batch = collate(chunk, bucket, model.layout.special_id("<PAD>"), block)
        prepared = objective.prepare(batch.to(model.device), generator)
        causal = loaded.objective == "ar"
        hidden = model(
            prepared.inputs,
            attention_mask=prepared.batch.attention_mask,
            instruction_lengths=None if causal else prepared.batch.instruction_lengths,
            causal=causal,
        )
        scored = prepared.scored & (prepared.targets != pad)  # content tokens only
        h, y = hidden[scored], prepared.targets[scored]
        group = model.groups.group_of(y)
        for index, name in enumerate(model.groups.names):
            rows = group == index
            if not bool(rows.any()):
                continue
            logits = model.head_logits(h[rows], name).float()
            local = y[rows] - model.groups.start[name]
            nll += float(F.cross_entropy(logits, local, reduction="sum"))
            correct += int((logits.argmax(-1) == local).sum())
            count += int(rows.sum())
    if count == 0:
        raise ValueError(f"no scored token in the {bucket} eval samples")
    return nll / count, correct / count


def run(context: TaskContext) -> TaskResult:
    """Score and generate every eval sample of ``text2image`` and ``text2audio``."""
    loaded, suite = context.loaded, context.suite
    tokenizers = loaded.tokenizers
    result = TaskResult()
    for target, bucket in TARGETS.items():
        samples = context.samples.get(bucket, [])
        if not samples:
            result.notes.append(f"generation {bucket}: no eval samples, skipped")
            continue
        prefix = f"generation/{bucket}"
        nll, accuracy = reference_scores(context, bucket, samples)
        result.metrics[f"{prefix}/nll"] = nll
        result.metrics[f"{prefix}/accuracy"] = accuracy
        result.metrics[f"{prefix}/samples"] = float(len(samples))
        result.headline += [f"{prefix}/nll", f"{prefix}/accuracy"]
        start = loaded.model.groups.start[target]
        parts = [split_sample(sample) for sample in samples]
        references = [response[1:-2] - start for _, response in parts]  # <BO*> ids <EO*> <EOS>
        generated: list = [None] * len(samples)
        by_length: dict[int, list[int]] = {}  # a batch shares one canvas length
        for index, media in enumerate(references):
            by_length.setdefault(len(media), []).append(index)
        for length, indices in sorted(by_length.items()):
            for chunk in batches(indices, suite.batch_size):
                out = generate_batch(
                    loaded, [parts[i][0] for i in chunk], target, context.sampler, length,
                    seed=suite.seed,
                )  # fmt: skip
                for i, response in zip(chunk, out.responses, strict=True):
                    generated[i] = response
        result.outputs[bucket] = generated
        prompts = [
            tokenizers.text.decode(ids.tolist())
            for ids in (span_ids(s, "text", tokenizers.layout) for s in samples[:EXAMPLES])
            if ids is not None
        ]
        if target == "image":
            ref = tokenizers.image.decode(torch.stack(references)).cpu()
            gen = tokenizers.image.decode(torch.stack(generated)).cpu()
            result.examples += [Example(bucket, p, ref[i], gen[i]) for i, p in enumerate(prompts)]
            for key, value in image_quality(gen, ref).items():
                result.metrics[f"{prefix}/{key}"] = value
            result.headline += [f"{prefix}/psnr", f"{prefix}/ssim"]
            _recognise(context, result, prefix, "image", samples, gen, ref)
            shown = min(len(samples), 8)
            result.artifacts["grids/text2image.png"] = png_bytes(grid(ref[:shown], gen[:shown]))
            for index in range(min(suite.artifacts, len(samples))):
                result.artifacts[f"samples/text2image-{index}.png"] = png_bytes(gen[index])
        else:
            mels = [
                (tokenizers.audio.decode(g), tokenizers.audio.decode(r))
                for g, r in zip(generated, references, strict=True)
            ]
            result.metrics[f"{prefix}/mel_l1"] = sum(mel_l1(g, r) for g, r in mels) / len(mels)
            result.headline.append(f"{prefix}/mel_l1")
            generated_mels, reference_mels = [g for g, _ in mels], [r for _, r in mels]
            result.examples += [
                Example(bucket, p, reference_mels[i], generated_mels[i])
                for i, p in enumerate(prompts)
            ]
            _recognise(context, result, prefix, "audio", samples, generated_mels, reference_mels)
            filters = tokenizers.audio.feature_extractor.mel_filters
            for index, (mel, _) in enumerate(mels[: suite.artifacts]):
                wave = wav_bytes(mel_to_waveform(mel, filters))
                result.artifacts[f"samples/text2audio-{index}.wav"] = wave
    return result


def _recognise(
    context: TaskContext,
    result: TaskResult,
    prefix: str,
    medium: str,
    samples: list[TokenSample],
    generated: Tensor | list[Tensor],
    references: Tensor | list[Tensor],
) -> None:
    """``{prefix}/recognised``: share of generated media recognised as the prompted class,
    with the ceiling (references), chance and the majority baseline."""
    judge = context.recogniser(medium, result, prefix)
    if judge is None:
        return
    labelled, labels = judge.judged(samples, prefix, result.notes)
    if not labelled:
        return
    predicted = judge.predict(generated)
    scores = label_scores([predicted[i] for i in labelled], labels, judge.classes, judge.majority)
    truth = judge.predict(references)
    ceiling = sum(truth[i] == y for i, y in zip(labelled, labels, strict=True)) / len(labels)
    result.metrics[f"{prefix}/recognised"] = scores["accuracy"]
    result.metrics[f"{prefix}/recognised_ceiling"] = ceiling
    result.metrics[f"{prefix}/recognised_chance"] = scores["chance"]
    result.metrics[f"{prefix}/recognised_majority"] = scores["majority"]
    result.headline.append(f"{prefix}/recognised")
