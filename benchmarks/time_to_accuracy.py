"""Steps and seconds for DFM and the AR baseline to caption held-out digits right.

Both objectives train the same ``tiny`` model on the same tokens with the same optimizer
(``evaluation/learning_probe.py``: raw 8x8 UCI digits, "the digit <word>"), one thread
each, scored every ``--every`` steps through their own samplers, until ``--target`` of the
held-out captions name the right digit or ``--max-steps``. The baseline is AR; the ratio
is DFM's seconds over AR's (below 1: DFM is faster). The digits corpus through the real
tokenizers is ``make demo``'s job; this isolates the objective.

    python benchmarks/time_to_accuracy.py [--target 0.9] [--max-steps 1500]

Writes ``benchmarks/results/time_to_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from evaluation.learning_probe import run_probe

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    for objective in ("dfm", "ar"):
        points = run_probe(objective, steps=args.max_steps, every=args.every, stop_at=args.target)
        reached = points[-1].accuracy >= args.target
        runs[objective] = {"reached": reached, "steps": points[-1].step,
                           "seconds": round(points[-1].seconds, 1),
                           "curve": [asdict(p) for p in points]}  # fmt: skip
        print(f"{objective}: {'reached' if reached else 'did not reach'} {args.target:.0%} "
              f"at step {points[-1].step} ({points[-1].seconds:.0f} s of training), "
              f"accuracy {points[-1].accuracy:.1%}")  # fmt: skip
    dfm, ar = runs["dfm"], runs["ar"]
    ratio = dfm["seconds"] / ar["seconds"] if ar["seconds"] else None
    result = {
        "name": "time_to_accuracy",
        "value": dfm["seconds"],
        "baseline": ar["seconds"],
        "ratio": round(ratio, 3) if ratio else None,
        "target": f"DFM and AR both reach {args.target:.0%} image -> caption; ratio <= 1",
        "unit": "seconds of training to the target (DFM / AR)",
        "both_reached": dfm["reached"] and ar["reached"],
        "runs": runs,
        "settings": vars(args),
        "machine": platform.platform(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "time_to_accuracy.json").write_text(json.dumps(result, indent=2))
    print(f"DFM / AR seconds: {result['ratio']} -> benchmarks/results/time_to_accuracy.json")


if __name__ == "__main__":
    main()
