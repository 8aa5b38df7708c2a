"""Generation: text -> image and text -> audio.

Two views of each ``text2X`` eval sample:

* the reference response under the model, scored as in training (``Objective.prepare``:
  the run's path corrupts the response at a seeded ``t``, or the AR shift): token NLL
  (nats per scored token) and accuracy of the argmax at the scored positions;
* a generated medium of the reference's length, decoded by the tokenizer's decoder and
  compared with the decoded reference: PSNR and SSIM for images, mel-L1 for audio. A few
  are kept as PNG / WAV, and one grid per evaluation (references above, generated below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluation.anytoany import generate_batch
from evaluation.media_io import grid, mel_to_waveform, png_bytes, wav_bytes
from evaluation.metrics import image_quality, mel_l1
from evaluation.tasks.base import TaskContext, TaskResult, batches, split_sample
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
        scored = prepared.scored
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
        references, generated = [], []
        for sample in samples:  # one at a time for audio: every clip has its own length
            instruction, response = split_sample(sample)
            media = response[1:-2] - start  # <BO*> ids <EO*> <EOS>
            out = generate_batch(
                loaded, [instruction], target, context.sampler, len(media), seed=suite.seed
            )
            references.append(media)
            generated.append(out.responses[0])
        result.outputs[bucket] = generated
        if target == "image":
            ref = tokenizers.image.decode(torch.stack(references)).cpu()
            gen = tokenizers.image.decode(torch.stack(generated)).cpu()
            for key, value in image_quality(gen, ref).items():
                result.metrics[f"{prefix}/{key}"] = value
            result.headline += [f"{prefix}/psnr", f"{prefix}/ssim"]
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
            filters = tokenizers.audio.feature_extractor.mel_filters
            for index, (mel, _) in enumerate(mels[: suite.artifacts]):
                wave = wav_bytes(mel_to_waveform(mel, filters))
                result.artifacts[f"samples/text2audio-{index}.wav"] = wave
    return result
