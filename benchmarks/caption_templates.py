"""Image -> text alone on a finished demo workspace's own tokens: DFM vs AR, and DFM on
the same images with the captions rewritten, to show what makes captions learnable.

The same ``tiny`` model, optimizer and batches as the trainer's objective, on the
``image2text`` train samples of ``<workspace>/tokens`` (the real VQ image tokens), scored on
``--held-out`` eval images through the same samplers the evaluation uses; a caption is right
when the only digit it names (word or numeral) is the image's label (chance 10%). Arms:
DFM on the corpus's captions (eight templates, the digit always the third word), AR on the
same (the baseline), DFM on "the digit <word>" for every image, and DFM on eight templates
that move the digit from the first to the sixth word (the corpus's templates before the
digit got its fixed place). Rewritten captions are re-encoded with the workspace's BPE. The
ratio is DFM's accuracy over AR's.

    python benchmarks/caption_templates.py [--config configs/demo.yaml] [--steps 600]

Needs ``omni run --config CONFIG`` (or shard, tokenizers and pretokenize) done first.
Writes ``benchmarks/results/caption_templates.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.storage import Storage
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.train.inputs import TrainInputs, gather_inputs
from pipelines.train.stage import model_config
from tokenization.bundle import Tokenizers
from tokenization.token_samples import TokenSample, read_token_samples
from tokenization.vocab import VocabLayout
from training.autoregressive import ar_generate
from training.dfm import PathConfig, build_path
from training.generation import generate
from training.micro_batch import collate
from training.model import MEDIA, OmniModel
from training.objective import Objective

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def named_digit(caption: str) -> str | None:
    """The one digit a caption names (as a word or a numeral), or None."""
    found = {str(i) for i, word in enumerate(WORDS) if re.search(rf"\b{word}\b", caption)}
    found |= set(re.findall(r"\b\d\b", caption))
    return found.pop() if len(found) == 1 else None


# The corpus's image caption templates before the digit got a fixed place (words.py).
MOVING_SLOT = (
    "a handwritten {word}",
    "the digit {digit}",
    "a picture of the number {word}",
    "a handwritten digit {digit}",
    "the number {word}, written by hand",
    "an image of a {word}",
    "a scanned {word}",
    "{word}",
)


def rewritten(
    sample: TokenSample, caption: str, tokens: Tokenizers, layout: VocabLayout
) -> TokenSample:
    """The sample with its response replaced by ``caption`` (then ``<EOS>``)."""
    n = sample.meta["instruction_length"]
    ids = tokens.text.encode([caption])[0]
    response = [int(layout.to_unified("text", i)) for i in ids] + [layout.special_id("<EOS>")]
    body = torch.tensor(response, dtype=sample.tokens.dtype)
    return TokenSample(
        sample.key,
        torch.cat([sample.tokens[:n], body]),
        torch.cat([sample.modality[:n], torch.zeros(len(response), dtype=sample.modality.dtype)]),
        {**sample.meta, "length": n + len(response)},
    )


def one_template(sample: TokenSample) -> str:
    """ "the digit <word>" for the sample's label."""
    return f"the digit {WORDS[int(sample.meta['label'])]}"


def moving_slot(sample: TokenSample, index: int) -> str:
    """One of :data:`MOVING_SLOT` (by the sample's index), filled with its label."""
    digit = int(sample.meta["label"])
    return MOVING_SLOT[index % len(MOVING_SLOT)].format(word=WORDS[digit], digit=digit)


def run_arm(
    config: PipelineConfig,
    inputs: TrainInputs,
    tokens: Tokenizers,
    train: list[TokenSample],
    held: list[TokenSample],
    objective: str,
    steps: int,
    every: int,
    batch: int,
    lr: float,
) -> list[dict[str, Any]]:
    """Train one arm from the same seed; its accuracy every ``every`` steps."""
    layout = VocabLayout(**inputs.layout)
    codebooks = {m: torch.tensor(np.asarray(inputs.codebooks[m])) for m in MEDIA}
    torch.manual_seed(0)
    model = OmniModel(model_config(config.model), layout, codebooks)
    path_config = PathConfig.model_validate(config.model.path.model_dump())
    path = build_path(path_config, layout) if objective == "dfm" else None
    loss_of = Objective(model, objective, path, "cross_entropy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    pad, eos = layout.special_id("<PAD>"), layout.special_id("<EOS>")
    block = config.train.dgs_block if objective == "dfm" else None
    sampler = config.eval.suites["default"].sampler
    points, trained = [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        picked = torch.randint(0, len(train), (batch,), generator=generator).tolist()
        micro = collate([train[i] for i in picked], "image2text", pad, block)
        prepared = loss_of.prepare(micro, generator)
        sums, _, _ = loss_of(prepared.inputs, micro.attention_mask, micro.instruction_lengths,
                             prepared.targets, prepared.scored, prepared.t)  # fmt: skip
        optimizer.zero_grad()
        (sums["ce"] / prepared.counts["ce"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 20)
        optimizer.step()
        trained += time.perf_counter() - started
        if step % every == 0 or step == steps:
            model.eval()
            right, shown = 0, []
            with torch.no_grad():
                for start in range(0, len(held), 50):
                    chunk = held[start : start + 50]
                    prompts = torch.stack([s.tokens[: s.meta["instruction_length"]] for s in chunk])
                    rows = (
                        generate(
                            model,
                            prompts,
                            "text",
                            path,
                            sampler,
                            None,
                            None,
                            torch.Generator().manual_seed(0),
                        )  # fmt: skip
                        if objective == "dfm"
                        else ar_generate(model, prompts, sampler.max_length, "text", eos)
                    )
                    for sample, row in zip(chunk, rows, strict=True):
                        ids = np.asarray(row.tolist())
                        _, local = layout.to_local(ids[layout.modality_of(ids) == 0])
                        caption = tokens.text.decode(local.tolist()) if len(ids) else ""
                        right += named_digit(caption) == sample.meta["label"]
                        shown.append(caption)
            model.train()
            points.append({"step": step, "seconds": round(trained, 1),
                           "accuracy": right / len(held), "captions": shown[:4]})  # fmt: skip
            print(f"  step {step}: {right / len(held):.1%} {shown[:3]}", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--held-out", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_pipeline_config(args.config)
    inputs = gather_inputs(config, Storage())
    layout = VocabLayout(**inputs.layout)
    tokens = Tokenizers.load(Path(config.workspace) / "tokenizers")
    train = [s for s in read_token_samples(inputs.shards["image2text"])
             if s.meta["split"] == "train"]  # fmt: skip
    held = [s for s in read_token_samples(inputs.eval_shards["image2text"])
            if s.meta["split"] == "eval"][: args.held_out]  # fmt: skip
    arms = {
        "dfm": ("dfm", train),
        "ar": ("ar", train),
        "dfm_one_template": (
            "dfm",
            [rewritten(s, one_template(s), tokens, layout) for s in train],
        ),
        "dfm_moving_slot": (
            "dfm",
            [rewritten(s, moving_slot(s, i), tokens, layout) for i, s in enumerate(train)],
        ),
    }
    runs = {}
    for name, (objective, samples) in arms.items():
        print(f"{name}:", flush=True)
        runs[name] = run_arm(config, inputs, tokens, samples, held, objective, args.steps,
                             args.every, args.batch, args.lr)  # fmt: skip
    value, baseline = runs["dfm"][-1]["accuracy"], runs["ar"][-1]["accuracy"]
    result = {
        "name": "caption_templates",
        "value": value,
        "baseline": baseline,
        "ratio": round(value / baseline, 3) if baseline else None,
        "target": 1.0,
        "unit": "fraction of held-out image captions naming the right digit (DFM / AR)",
        "chance": 0.1,
        "steps": args.steps,
        "batch": args.batch,
        "train_samples": len(train),
        "held_out": len(held),
        "runs": runs,
        "machine": platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "caption_templates.json").write_text(json.dumps(result, indent=2))
    print(f"DFM {value:.1%} vs AR {baseline:.1%} (ratio {result['ratio']}); DFM on one "
          f"template {runs['dfm_one_template'][-1]['accuracy']:.1%}, on templates that move "
          f"the digit {runs['dfm_moving_slot'][-1]['accuracy']:.1%}; chance 10%")  # fmt: skip


if __name__ == "__main__":
    main()
