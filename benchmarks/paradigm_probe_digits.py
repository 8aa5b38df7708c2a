"""The paper's DFM-vs-AR comparison on learnable data, with seeds: image -> caption on the
UCI digits (``evaluation/learning_probe.py``), the same ``tiny`` model, tokens, optimizer
and steps for every arm, three seeds each, mean +- std of the held-out accuracy.

Arms: DFM (the project's default), DFM without response position embeddings, and the AR
baseline. Understanding only: this probe has no media responses, so the reconstruction
terms and generation are not compared here (``configs/ablation/`` runs those through
``omni eval compare`` on a workspace).

    python benchmarks/paradigm_probe_digits.py [--steps 300] [--seeds 0 1 2]

Writes ``benchmarks/results/paradigm_probe_digits.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from evaluation.learning_probe import run_probe

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "dfm": {"objective": "dfm"},
    "dfm, no response positions": {"objective": "dfm", "response_positions": 0},
    "ar": {"objective": "ar"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    scores: dict[str, list[float]] = {}
    for arm, settings in ARMS.items():
        for seed in args.seeds:
            [point] = run_probe(steps=args.steps, seed=seed, **settings)
            scores.setdefault(arm, []).append(point.accuracy)
            print(f"{arm} seed {seed}: {point.accuracy:.1%} ({point.seconds:.0f} s)", flush=True)
    rows = ["| arm | image -> caption, digit named (mean +- std) | seeds |", "|---|---|---|"]
    summary = {}
    for arm, values in scores.items():
        mean, std = statistics.mean(values), statistics.pstdev(values)
        summary[arm] = {"mean": mean, "std": std, "values": values}
        rows.append(
            f"| {arm} | {mean:.1%} +- {std:.1%} | {', '.join(f'{v:.1%}' for v in values)} |"
        )
    table = "\n".join(rows) + f"\n\nchance 10%; {args.steps} steps, batch 32, tiny, one thread\n"
    print(table)
    dfm, ar = summary["dfm"], summary["ar"]
    result = {
        "name": "paradigm_probe_digits",
        "value": dfm["mean"],
        "baseline": ar["mean"],
        "ratio": round(dfm["mean"] / ar["mean"], 3) if ar["mean"] else None,
        "target": "the paper: DFM >= AR on understanding (ratio >= 1)",
        "unit": "held-out image -> caption accuracy (DFM / AR)",
        "arms": summary,
        "steps": args.steps,
        "seeds": args.seeds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "paradigm_probe_digits.md").write_text(table)
    (RESULTS / "paradigm_probe_digits.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
