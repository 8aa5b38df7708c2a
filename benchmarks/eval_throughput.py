"""Evaluation cost: samples/s of each task on ``tiny`` (CPU), and a sweep with nothing to do.

1. Tasks (needs a trained run: ``make demo`` first). The latest checkpoint of the newest
   training run of ``--config``'s experiment is loaded once; each task of the default suite
   then runs ``--repeats`` times on the same in-memory samples and the median is reported
   as samples/s (samples = the eval samples that task reads). Loading (checkpoint,
   tokenizers, samples) is timed apart, once.
2. Idle sweep. A synthetic experiment in a temporary local MLflow store: ``--runs`` training
   runs x ``--checkpoints`` complete checkpoints, every one already evaluated (done
   records). ``sweep()`` must find nothing to do: it lists the runs (one search), their
   checkpoints and done records. Target: under 5 s for 20 runs x 10 checkpoints.

    python benchmarks/eval_throughput.py [--config configs/sample.yaml] [--skip-tasks]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from evaluation.claims import ClaimStore
from evaluation.tasks import TASKS, TaskContext
from infra.config import validate
from infra.storage import Storage
from infra.tracking import open_experiment
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.eval import stage as eval_stage
from training.checkpointing import COMPLETE, step_name

RESULTS = Path(__file__).parent / "results" / "eval_throughput.json"


def task_rates(config_path: str, repeats: int) -> dict:
    config = load_pipeline_config(config_path)
    session = eval_stage.Session(config)
    runs = session.client.search_runs(
        [session.experiment_id],
        "tags.`omni.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"no training run in {config.mlflow.experiment}: run `make demo` first")
    suite = config.eval.suite("default")
    started = time.perf_counter()
    loaded = session.load(runs[0].info.run_id, None, suite)
    samples = session.samples("default", suite)
    load_s = time.perf_counter() - started
    context = TaskContext(loaded, suite, samples, int(loaded.run.train.get("dgs_block", 32)))
    out = {"run_id": loaded.run.run_id, "step": loaded.step, "load_seconds": round(load_s, 2)}
    for name in suite.tasks:
        module = TASKS[name]
        count = sum(len(samples.get(b, [])) for b in module.BUCKETS)
        if name == "speed":
            count = min(count, suite.batch_size)
        times = []
        for _ in range(repeats):
            begun = time.perf_counter()
            module.run(context)
            times.append(time.perf_counter() - begun)
        median = statistics.median(times)
        out[name] = {
            "samples": count,
            "seconds": round(median, 3),
            "samples_per_s": round(count / median, 2),
        }
    return out


def idle_sweep(runs: int, checkpoints: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Path(scratch)
        config = validate(
            PipelineConfig,
            {
                "workspace": str(workspace),
                "corpus": {"inputs": [{"uri": "x", "format": "jsonl"}]},
                "mlflow": {"experiment": "idle-sweep"},
            },
        )
        client, experiment = open_experiment(config.mlflow, str(workspace))
        store = ClaimStore(Storage(), str(workspace), "default", 60, 3)
        for index in range(runs):
            run_id = client.create_run(experiment, tags={"omni.stage": "train"}).info.run_id
            for step in range(10, 10 * checkpoints + 1, 10):
                folder = workspace / "checkpoints" / run_id / step_name(step)
                folder.mkdir(parents=True)
                (folder / COMPLETE).write_text("{}")
                store.finish(
                    run_id, step, {"status": "finished", "metrics": {"m": index}, "headline": ["m"]}
                )
        eval_stage.sweep(config)  # writes the report once (a first sweep would, too)
        times = []
        for _ in range(3):
            begun = time.perf_counter()
            report = eval_stage.sweep(config)
            times.append(time.perf_counter() - begun)
            assert report.evaluated == 0 and len(report.rows) == runs * checkpoints
    median = statistics.median(times)
    return {
        "runs": runs,
        "checkpoints": checkpoints,
        "seconds": round(median, 3),
        "target_seconds": 5.0,
        "met": median < 5.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--skip-tasks", action="store_true", help="only the idle sweep")
    args = parser.parse_args()
    result = {"idle_sweep": idle_sweep(args.runs, args.checkpoints)}
    print(json.dumps(result, indent=2), flush=True)
    if not args.skip_tasks:
        result["tasks"] = task_rates(args.config, args.repeats)
        print(json.dumps(result["tasks"], indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
