"""What the sampler's shortcuts cost in quality, on a trained checkpoint, and what they buy.

Every setting of :data:`SETTINGS` evaluates one checkpoint of an ``omni train`` run with the
evaluation tasks themselves (``understanding``: caption BLEU, ASR WER; ``generation``:
text -> image PSNR, text -> audio mel-L1; ``speed``: response tokens/s of one batch of
``text2image`` instructions), on the same samples, once per seed in ``--seeds`` at
``--temperature``, and once greedy. The yardstick is ``reference``: one token committed per
step, no cache (the slowest, most exact DFM decoding).

- **Spread**: the reference's seed-to-seed spread. A setting preserves quality when no
  metric's mean over the seeds is worse than the reference's mean by more than two
  standard deviations (over the seeds) of the reference (1e-3 at least, so that a metric
  that never moves does not demand bit-equality); better is never a cost. The greedy
  run's metrics are reported beside them (one run: no spread to judge by).
- **Agreement**: per seed, the share of positions where the setting's tokens equal the
  reference's under the same seed (a length difference counts as disagreement), next to
  the reference's agreement with itself under the next seed (what sampling alone changes);
  and greedy, where the reference is deterministic.

With several ``--run`` checkpoints (the same recipe, other seeds), each is judged on its
own and a setting keeps quality only where it keeps it on every one: one checkpoint's seed
spread is a noisy judge (a fixed 4 tokens a step passed on one demo checkpoint by 0.002 of
mel-L1 and failed on the next two). The fastest quality-preserving setting, by its mean
tokens/s over the checkpoints, is the headline against the reference; the sampler defaults
of ``omni generate`` and the evaluation suites (``evaluation.config``) follow it.

    python benchmarks/sampler_quality.py --config configs/sample.yaml --run RUN_ID [RUN_ID ...] \\
        [--step N] [--split train] [--samples 8] [--seeds 0 1 2] [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from evaluation.anytoany import pad_rows  # noqa: E402
from evaluation.tasks import TASKS, TaskContext  # noqa: E402
from evaluation.tasks.base import split_sample  # noqa: E402
from pipelines.config import load_pipeline_config  # noqa: E402
from pipelines.eval.session import Session  # noqa: E402
from training.autoregressive import ar_generate  # noqa: E402
from training.sampling import SamplerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sampler_quality.json"
TARGET_SPEEDUP = 2.0  # the fastest quality-preserving setting against one token per step
TOLERANCE_FLOOR = 1e-3
TASK_NAMES = ("understanding", "generation", "speed")
# metric name ending -> +1 when higher is better, -1 when lower is
QUALITY = {"/bleu": 1, "/wer": -1, "/psnr": 1, "/mel_l1": -1}
NO_CACHE = {"cache": {"enabled": False}}
# full refresh every 8 steps (the default): at k = 4 once per block of 32, as Fast-dLLM's
# dual cache refreshes at every block; the canvases here (<= 64 positions, one block
# boundary) could not show what a stale cache costs on long ones
ACTIVE = {"cache": {"strategy": "active"}}
# name -> overrides of the suite's sampler; k = tokens committed per step, tau = threshold
# commits (with k: k at least); block32 = semi-autoregressive blocks of 32 with the active
# (Fast-dLLM) cache
SETTINGS: dict[str, dict[str, Any]] = {
    "reference": {"tokens_per_step": 1, **NO_CACHE},
    "adaptive_k1": {"tokens_per_step": 1},
    "nocache_k8": {"tokens_per_step": 8, **NO_CACHE},
    "adaptive_k8": {"tokens_per_step": 8},  # the paper's setting: whole canvas, adaptive cache
    "block32_k2": {"tokens_per_step": 2, "decode_block": 32, **ACTIVE},
    "block32_k4": {"tokens_per_step": 4, "decode_block": 32, **ACTIVE},
    "block16_k4": {"tokens_per_step": 4, "decode_block": 16, **ACTIVE},
    "block32_k8": {"tokens_per_step": 8, "decode_block": 32, **ACTIVE},
    "block32_k16": {"tokens_per_step": 16, "decode_block": 32, **ACTIVE},
    "nocache_tau0.9": {"tau": 0.9, **NO_CACHE},
    "block32_tau0.9": {"tau": 0.9, "decode_block": 32, **ACTIVE},
    "block32_tau0.7": {"tau": 0.7, "decode_block": 32, **ACTIVE},
    "block32_tau0.5": {"tau": 0.5, "decode_block": 32, **ACTIVE},
    "block32_tau0.4": {"tau": 0.4, "decode_block": 32, **ACTIVE},
    "block32_tau0.3": {"tau": 0.3, "decode_block": 32, **ACTIVE},
    "block16_tau0.5": {"tau": 0.5, "decode_block": 16, **ACTIVE},
    "block64_tau0.5": {"tau": 0.5, "decode_block": 64, **ACTIVE},
    # at least 4 a step, and every other position above tau (Fast-dLLM's threshold over
    # the default's budget)
    "block32_k4_tau0.9": {"tokens_per_step": 4, "tau": 0.9, "decode_block": 32, **ACTIVE},
    "block32_k4_tau0.7": {"tokens_per_step": 4, "tau": 0.7, "decode_block": 32, **ACTIVE},
}


Outputs = dict[str, list[torch.Tensor]]  # task output name -> generated ids per sample


def agreement(a: Outputs, b: Outputs) -> float:
    """Share of positions where two runs' generated ids agree, over every output and
    sample; extra length disagrees."""
    same = total = 0
    pairs = [(x, y) for name in sorted(a) for x, y in zip(a[name], b[name], strict=True)]
    for x, y in pairs:
        n = min(len(x), len(y))
        same += int((x[:n] == y[:n]).sum())
        total += max(len(x), len(y))
    return same / max(total, 1)


def evaluate(
    loaded: Any, samples: dict, suite: Any, block: int
) -> tuple[dict[str, float], Outputs]:
    """Metrics and generated ids of the three tasks under ``suite``."""
    context = TaskContext(loaded, suite, samples, block)
    metrics: dict[str, float] = {}
    outputs: Outputs = {}
    for name in TASK_NAMES:
        result = TASKS[name].run(context)
        metrics.update(result.metrics)
        outputs.update(result.outputs)
    return metrics, outputs


def ar_tokens_per_s(loaded: Any, samples: dict, batch: int, repeats: int = 3) -> float:
    """Greedy KV-cached AR decoding on the same weights and the speed task's work (one batch
    of ``text2image`` instructions, an image's tokens each): the AR yardstick's speed only
    (the checkpoint was trained for DFM, so its AR outputs mean nothing)."""
    model, layout = loaded.model, loaded.model.layout
    begin = torch.tensor([layout.special_id("<BOI>")])
    rows = [torch.cat([split_sample(s)[0], begin]) for s in samples["text2image"][:batch]]
    ids, mask = pad_rows(rows, layout.special_id("<PAD>"))
    ids, mask = ids.to(loaded.device), None if mask is None else mask.to(loaded.device)
    tokens = loaded.tokenizers.image.tokens_per_image
    with torch.inference_mode():
        ar_generate(model, ids, tokens, "image", None, mask)  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            ar_generate(model, ids, tokens, "image", None, mask)
            seconds.append(time.perf_counter() - started)
    return len(rows) * tokens / statistics.median(seconds)


def sampler_for(
    base: SamplerConfig, overrides: dict[str, Any], temperature: float
) -> SamplerConfig:
    """The suite's canvas settings (DGS block, longest text, ``<EOS>`` threshold, steps)
    with the decoding of one setting: every other field at its ``SamplerConfig`` default,
    so that a setting means the same whatever the suite's own sampler does."""
    canvas = {k: getattr(base, k) for k in ("steps", "block_size", "max_length", "eos_threshold")}
    return SamplerConfig.model_validate({**canvas, **overrides, "temperature": temperature})


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting: mean/sd of each quality metric, whether it is no worse than the
    reference beyond its spread, the greedy run's value, agreement with the reference
    (sampled, greedy), median tokens/s."""
    reference = runs["reference"]
    keys = sorted(k for k in reference["metrics"][0] if k.endswith(tuple(QUALITY)))
    table: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        row: dict[str, Any] = {"metrics": {}, "within_spread": True}
        for key in keys:
            mean, sd = mean_sd([m[key] for m in run["metrics"]])
            ref_mean, ref_sd = mean_sd([m[key] for m in reference["metrics"]])
            better = QUALITY["/" + key.rsplit("/", 1)[1]]
            ok = better * (mean - ref_mean) >= -max(2 * ref_sd, TOLERANCE_FLOOR)
            greedy = round(run["greedy_metrics"][key], 4)
            row["metrics"][key] = {
                "mean": round(mean, 4),
                "sd": round(sd, 4),
                "within": ok,
                "greedy": greedy,
            }
            row["within_spread"] &= ok
        row["agreement"] = round(statistics.fmean(run["agreement"]), 4)
        row["agreement_greedy"] = round(run["agreement_greedy"], 4)
        row["tokens_per_s"] = round(statistics.median(run["tokens_per_s"]), 1)
        row["seconds"] = round(run["seconds"], 1)
        table[name] = row
    return table


def plot(table: dict[str, dict[str, Any]], self_agreement: float, out: Path) -> None:
    """Agreement with the reference against tokens/s, one point per setting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in table.items():
        colour = "tab:green" if row["within_spread"] else "tab:red"
        ax.scatter(row["tokens_per_s"], row["agreement"], color=colour)
        ax.annotate(name, (row["tokens_per_s"], row["agreement"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axhline(self_agreement, color="grey", linestyle="--",
               label=f"reference vs itself, next seed ({self_agreement:.2f})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("text -> image response tokens/s (log)")
    ax.set_ylabel("token agreement with the reference (same seed)")
    ax.set_title("green: no metric worse than the reference beyond its seed spread", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def measure_run(
    session: Session, run_id: str, step: int | None, base_suite: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Every setting of ``args.settings`` on one checkpoint: its table (:func:`summarise`),
    the reference's agreement with itself, the AR yardstick and what was compared."""
    loaded = session.load(run_id, step, base_suite)
    if loaded.path is None:
        raise SystemExit(f"run {run_id} is an AR run: nothing to compare")
    block = int(loaded.run.train.get("dgs_block", 32))
    samples = session.samples("quality", base_suite)
    print(f"run {run_id} step {loaded.step}; samples: "
          + ", ".join(f"{b} {len(s)}" for b, s in samples.items()), flush=True)  # fmt: skip

    runs: dict[str, dict[str, Any]] = {}
    for name in args.settings:
        started = time.perf_counter()
        run: dict[str, Any] = {"metrics": [], "outputs": [], "tokens_per_s": []}
        for temperature, seed in [(args.temperature, s) for s in args.seeds] + [(0.0, 0)]:
            sampler = sampler_for(base_suite.sampler, SETTINGS[name], temperature)
            suite = base_suite.model_copy(update={"sampler": sampler, "seed": seed})
            metrics, outputs = evaluate(loaded, samples, suite, block)
            if temperature == 0.0:
                run["greedy"], run["greedy_metrics"] = outputs, metrics
            else:
                run["metrics"].append(metrics)
                run["outputs"].append(outputs)
            run["tokens_per_s"].append(metrics.get("speed/tokens_per_s", float("nan")))
        run["seconds"] = time.perf_counter() - started
        runs[name] = run
        print(f"{name}: {run['seconds']:.0f} s, tokens/s {run['tokens_per_s']}", flush=True)

    reference = runs["reference"]
    for run in runs.values():
        run["agreement"] = [
            agreement(out, ref)
            for out, ref in zip(run["outputs"], reference["outputs"], strict=True)
        ]
        run["agreement_greedy"] = agreement(run["greedy"], reference["greedy"])
    outs = reference["outputs"]
    self_agreement = statistics.fmean(
        agreement(a, b) for a, b in zip(outs, outs[1:] + outs[:1], strict=True)
    ) if len(outs) > 1 else 1.0  # fmt: skip
    return {
        "table": summarise(runs),
        "step": loaded.step,
        "samples": {b: len(s) for b, s in samples.items()},
        # the tasks' outputs the agreement is over: generated responses of each
        "compared_outputs": {n: len(reference["greedy"][n]) for n in sorted(reference["greedy"])},
        "reference_self_agreement": round(self_agreement, 4),
        "ar_tokens_per_s": round(ar_tokens_per_s(loaded, samples, base_suite.batch_size), 1),
    }


def combine(tables: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per setting over the checkpoints' tables: it keeps quality only where it
    kept it on every checkpoint (one checkpoint's seed spread is a noisy judge: a setting
    can pass on one and fail on the next); metric means, agreements and tokens/s averaged."""
    first = next(iter(tables.values()))
    combined: dict[str, dict[str, Any]] = {}
    for name in first:
        rows = [table[name] for table in tables.values()]
        metrics = {
            key: {
                "mean": round(statistics.fmean(r["metrics"][key]["mean"] for r in rows), 4),
                "within": all(r["metrics"][key]["within"] for r in rows),
            }
            for key in first[name]["metrics"]
        }
        combined[name] = {
            "metrics": metrics,
            "within_spread": all(r["within_spread"] for r in rows),
            "agreement": round(statistics.fmean(r["agreement"] for r in rows), 4),
            "agreement_greedy": round(statistics.fmean(r["agreement_greedy"] for r in rows), 4),
            "tokens_per_s": round(statistics.fmean(r["tokens_per_s"] for r in rows), 1),
        }
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--run", nargs="+", required=True,
                        help="MLflow ids of omni train runs (DFM): a setting keeps quality "
                        "only where it keeps it on each")  # fmt: skip
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--split", default="train", choices=["train", "eval", "all"],
        help="samples to evaluate on (train: what the model has learnt)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=8, help="per bucket")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if "reference" not in args.settings:
        parser.error("--settings must include reference")

    config = load_pipeline_config(args.config, args.overrides)
    base_suite = config.eval.suite("default").model_copy(
        update={"split": args.split, "samples": args.samples, "artifacts": 0}
    )
    session = Session(config)
    checkpoints = {run: measure_run(session, run, args.step, base_suite, args) for run in args.run}
    table = combine({run: c["table"] for run, c in checkpoints.items()})
    preserving = [n for n, row in table.items() if row["within_spread"]]
    fastest = max(preserving, key=lambda n: table[n]["tokens_per_s"])
    value, baseline = table[fastest]["tokens_per_s"], table["reference"]["tokens_per_s"]
    ar = statistics.fmean(c["ar_tokens_per_s"] for c in checkpoints.values())
    first = next(iter(checkpoints.values()))
    self_agreement = statistics.fmean(c["reference_self_agreement"] for c in checkpoints.values())
    out = {
        "name": "sampler_quality",
        "value": value,
        "baseline": baseline,
        "ratio": round(value / baseline, 3),
        "target": TARGET_SPEEDUP,
        "unit": "text2image tokens/s (fastest setting within the reference's seed spread on "
        "every checkpoint; mean over them)",
        "fastest_preserving": fastest,
        "ar_tokens_per_s": round(ar, 1),  # same weights and work, greedy with the KV cache
        "ratio_vs_ar": round(value / ar, 3),
        "runs": args.run,
        "split": args.split,
        "samples": first["samples"],
        "seeds": args.seeds,
        "temperature": args.temperature,
        "compared_outputs": first["compared_outputs"],
        "reference_self_agreement": round(self_agreement, 4),
        "settings": {n: SETTINGS[n] for n in args.settings},
        "table": table,
        "checkpoints": checkpoints,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(table, self_agreement, args.out.with_suffix(".png"))
    for run, checkpoint in checkpoints.items():
        print(f"run {run} (step {checkpoint['step']}):")
        for name, row in checkpoint["table"].items():
            metrics = ", ".join(
                f"{k.split('/', 1)[1]} {v['mean']:.3f}+-{v['sd']:.3f}"
                f"{'' if v['within'] else ' (!)'} [greedy {v['greedy']:.3f}]"
                for k, v in row["metrics"].items()
            )
            print(f"{name:>22}: {row['tokens_per_s']:8.1f} tok/s, agree {row['agreement']:.2f} "
                  f"(greedy {row['agreement_greedy']:.2f}); {metrics}")  # fmt: skip
    print("every checkpoint:")
    for name, row in table.items():
        print(f"{name:>22}: {row['tokens_per_s']:8.1f} tok/s, keeps quality: "
              f"{'yes' if row['within_spread'] else 'no'}")  # fmt: skip
    print(f"reference vs itself (next seed): {self_agreement:.2f}")
    print(f"fastest within spread on every checkpoint: {fastest}, {value} vs {baseline} tok/s "
          f"= {out['ratio']}x; AR (KV cache, same weights, batch) {ar:.1f} tok/s: "
          f"{out['ratio_vs_ar']}x")  # fmt: skip
    print(f"written: {args.out}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
