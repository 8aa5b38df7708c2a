"""Step time of the full trainer (``omni train``, one CPU worker) against a bare PyTorch loop.

The full trainer is ``pipelines.train.run``: Ray Train with one worker
(``train.num_workers=1``, ``train.cpus_per_worker=2``), the DeepSpeed engine (ZeRO-2, the
default template) around ``training.objective.Objective``, MLflow logging every step; once
with GradNorm (the default ``train.loss_weighting=gradnorm``, the headline) and once with
fixed loss weights. Its step time is the ``train/step_seconds`` it logs (from fetching the
micro-batches to the end of the optimizer step and the GradNorm update); the final
checkpoint comes after the last timed step. Every run gets a fresh copy of the token
workspace (the stage skips a config it has already trained in a workspace).

The bare loop is what a user would write by hand in one process: the same ``OmniModel``
(same preset and seed), the same micro-batches (a ``BatchSource`` with the trainer's
settings) corrupted with the trainer's per-micro-batch generators, each loss term summed
and divided by its tokens in the step, ``backward``, gradient clipping, ``torch.optim.AdamW``
with the trainer's groups and learning-rate schedule; no Ray, DeepSpeed or MLflow, torch
threads = ``train.cpus_per_worker``. Step 1's loss must equal the trainer's (same weights,
batches and corruption); later steps drift apart because the trainer gives unused heads a
zero gradient (ZeRO needs every gradient) where the bare loop's AdamW skips them.

The three variants run one after the other ``--repeats`` times (order rotated); the first
``--warmup`` steps of each run are left out and the medians of the rest are compared.
Target: the trainer's median step at most 1.10x the bare loop's. On a shared machine wall
time follows the load, so the CPU seconds (user + system, every thread) per step of the
trainer's Ray worker and of the bare loop's process are reported too.

``--in-process`` (on by default) also runs the trainer's per-rank loop
(``training.train_loop.Trainer``, rank 0 of a gloo group of one, no Ray) with GradNorm and
with fixed weights in this process, interleaved step by step with the bare loop, and times
its parts (engine forward, backward, engine step, GradNorm's gradient measurement) in CPU
seconds: where the overhead is, and what GradNorm costs.

Only the buckets with short sequences (at most 290 positions) are trained by default, so a
``small`` step takes seconds on 2 CPUs; ``--buckets all`` adds interleaved and video.

    python benchmarks/trainer_overhead.py [--workspace WS] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from training_setup import (
    RESULTS,
    adamw,
    batch_source,
    build_objective,
    corruption_generator,
    machine,
    pipeline_config,
    prepare_workspace,
    set_environment,
    train_inputs,
)

TARGET_RATIO = 1.10  # trainer step time / bare loop step time, at most
SHORT_BUCKETS = ("audio2text", "image2text", "text", "text2audio", "text2image")
VARIANTS = ("gradnorm", "fixed", "bare")


def config_for(workspace: Path, args: argparse.Namespace, weighting: str) -> Any:
    """The pipeline config of one trainer run (the bare loop reads the same train section)."""
    overrides = [
        f"model.size={args.size}",
        "train.num_workers=1",
        f"train.cpus_per_worker={args.cpus}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.grad_accum={args.grad_accum}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.warmup_steps=1",
        "train.checkpoint_every=1000000",
        "train.log_every=1",
        f"train.loss_weighting={weighting}",
        f"ray.num_cpus={args.cpus}",
        "mlflow.experiment=bench-trainer-overhead",
    ]
    if args.buckets != "all":
        weights = ", ".join(f"{b}: 1.0" for b in args.buckets.split(","))
        overrides.append(f"train.bucket_weights={{{weights}}}")
    return pipeline_config(workspace, [*overrides, *args.set])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounded(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with its lists of seconds and losses rounded for the JSON."""
    return {k: [round(x, 4) for x in v] if isinstance(v, list) else v for k, v in run.items()}


class WorkerCpu(threading.Thread):
    """Samples the cumulative CPU seconds of this Ray instance's train worker (a descendant
    of this process) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(name="worker-cpu", daemon=True)
        self.interval, self.samples = interval, []  # (epoch seconds, cpu seconds)
        self.done = threading.Event()

    def _worker(self) -> psutil.Process | None:
        for child in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    def run(self) -> None:
        worker = None
        while not self.done.wait(self.interval):
            try:
                worker = worker or self._worker()
                if worker is not None:
                    cpu = worker.cpu_times()
                    self.samples.append((time.time(), cpu.user + cpu.system))
            except psutil.Error:
                worker = None

    def between(self, stamps: list[float]) -> list[float]:
        """CPU seconds of the worker between consecutive epoch-second ``stamps``."""
        if len(self.samples) < 2:
            return []
        times, cpu = np.array(self.samples).T
        at = np.interp(stamps, times, cpu)
        return [float(b - a) for a, b in zip(at, at[1:], strict=False)]


def trainer_run(config: Any) -> dict[str, Any]:
    """One ``omni train`` run: its step seconds, worker CPU seconds per step and losses."""
    from mlflow import MlflowClient

    from pipelines import train as train_stage

    sampler = WorkerCpu()
    sampler.start()
    try:
        report = train_stage.run(config)
    finally:
        sampler.done.set()
        sampler.join()
    if report.skipped or report.status != "FINISHED":
        raise RuntimeError(f"omni train did not train: {report}")
    client = MlflowClient(report.tracking_uri)

    def history(key: str) -> list[Any]:
        return sorted(client.get_metric_history(report.run_id, key), key=lambda m: m.step)

    losses = history("train/loss")
    shutil.rmtree(report.checkpoints, ignore_errors=True)  # about 1 GB for `small`
    return {
        "step_seconds": [m.value for m in history("train/step_seconds")],
        # Between the log calls of consecutive steps, as the bare loop's between step ends.
        "cpu_seconds": sampler.between([m.timestamp / 1000 for m in losses]),
        "loss": [m.value for m in losses],
    }


class BareLoop:
    """The hand-written loop over the trainer's model, batches and corruption."""

    def __init__(self, config: Any, inputs: Any) -> None:
        from training.learning_rate import lr_lambda

        self.train = config.train
        torch.set_num_threads(max(1, int(self.train.cpus_per_worker)))
        self.objective = build_objective(config, inputs)
        self.model = self.objective.model
        self.optimizer = adamw(self.model, self.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.train))
        self.source = batch_source(config, inputs)

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (1-based); returns its loss."""
        train, model, objective = self.train, self.model, self.objective
        batches = [next(self.source) for _ in range(train.grad_accum)]
        prepared = [
            objective.prepare(b, corruption_generator(train.seed, step, m))
            for m, b in enumerate(batches)
        ]
        totals: dict[str, int] = {}
        for item in prepared:
            for term, count in item.counts.items():
                totals[term] = totals.get(term, 0) + count
        loss_value = 0.0
        for item in prepared:
            hidden = model(
                item.inputs,
                attention_mask=item.batch.attention_mask,
                instruction_lengths=item.batch.instruction_lengths,
            )
            terms = objective.term_sums(hidden, item.inputs, item.targets, item.scored, item.t)
            loss = sum(train.loss_weights[t] * value / totals[t] for t, value in terms.items())
            loss.backward()
            loss_value += float(loss.detach())
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def close(self) -> None:
        self.source.close()


def bare_run(config: Any, inputs: Any) -> dict[str, Any]:
    """Every step of the bare loop: wall seconds, CPU seconds between step ends, losses."""
    loop = BareLoop(config, inputs)
    out: dict[str, list[float]] = {"step_seconds": [], "cpu_seconds": [], "loss": []}
    last_cpu = None
    try:
        for step in range(1, config.train.max_steps + 1):
            started = time.perf_counter()
            out["loss"].append(loop.step(step))
            out["step_seconds"].append(time.perf_counter() - started)
            cpu = time.process_time()
            if last_cpu is not None:
                out["cpu_seconds"].append(cpu - last_cpu)
            last_cpu = cpu
    finally:
        loop.close()
    return out


def local_trainer(config: Any, inputs: Any) -> Any:
    """``training.train_loop.Trainer`` planned as ``omni train`` plans it, in this process
    as rank 0 of 1 (the gloo group must exist), logging to an MLflow run in the workspace."""
    from infra.storage import Storage, join
    from infra.tracking import open_experiment, tracking_uri
    from pipelines.train.stage import create_run, worker_plan
    from training.run_control import RunControl
    from training.train_loop import Trainer, _cpu_collectives

    workspace = str(Path(config.workspace).absolute())
    client, experiment = open_experiment(config.mlflow, workspace)
    run_id = create_run(client, experiment, config, inputs)
    run_dir = join(join(workspace, "checkpoints"), run_id)
    plan = worker_plan(config, inputs, run_id, run_dir, tracking_uri(config.mlflow, workspace),
                       RunControl(Storage(config.storage), run_dir).claim())  # fmt: skip
    _cpu_collectives()
    trainer = Trainer(plan, 0, 1)
    trainer.setup()
    return trainer


def cpu_timed_parts(trainer: Any) -> dict[str, float]:
    """Wrap the trainer's parts (this instance only) with CPU-second accumulators."""
    parts: dict[str, float] = {}

    def wrap(owner: Any, name: str, key: str) -> None:
        inner, parts[key] = getattr(owner, name), 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                parts[key] += time.process_time() - started

        setattr(owner, name, timed)

    wrap(trainer.engine, "forward", "forward")
    wrap(trainer.engine, "backward", "backward")
    wrap(trainer.engine, "step", "engine step (clip, AdamW, ZeRO copies)")
    wrap(trainer, "_measure_gradients", "gradnorm gradient norms")
    return parts


def interleaved(workdir: Path, workspace: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``Trainer.train_step`` with GradNorm and with fixed weights and the bare loop in this
    process, step by step in rotating order (no Ray): CPU seconds per step and per part."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    os.environ.update(RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    sides: dict[str, Any] = {}
    parts: dict[str, dict[str, float]] = {}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    split: dict[str, list[dict[str, float]]] = {v: [] for v in ("gradnorm", "fixed")}
    try:
        for weighting in ("gradnorm", "fixed"):
            fresh = workdir / f"local-{weighting}"
            for part in ("tokens", "tokenizers"):
                shutil.copytree(workspace / part, fresh / part)
            config = config_for(fresh, args, weighting)
            sides[weighting] = local_trainer(config, train_inputs(config))
            parts[weighting] = cpu_timed_parts(sides[weighting])
        config = config_for(workspace, args, "fixed")
        sides["bare"] = BareLoop(config, train_inputs(config))
        for step in range(1, config.train.max_steps + 1):
            shift = step % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                before = dict(parts.get(variant, {}))
                started = time.process_time()
                if variant == "bare":
                    sides["bare"].step(step)
                else:
                    sides[variant].train_step(step)
                    split[variant].append({k: v - before[k] for k, v in parts[variant].items()})
                cpu[variant].append(time.process_time() - started)
            print(
                f"in-process step {step}: "
                + ", ".join(f"{v} {cpu[v][-1]:.2f}" for v in VARIANTS)
                + f" CPU s (load {machine()['load_average'][0]})",
                flush=True,
            )
    finally:
        for variant, side in sides.items():
            if variant == "bare":
                side.close()
            else:
                side.source.close()
                side.log.close()
        dist.destroy_process_group()
    skip = args.warmup
    medians = {v: median(cpu[v][skip:]) for v in VARIANTS}
    return {
        "what": "CPU seconds per step of Trainer.train_step (training.train_loop, gloo world "
        "1, no Ray) and of the bare loop, in one process, step-interleaved",
        "median_cpu_seconds": {v: round(medians[v], 3) for v in VARIANTS},
        "ratios": {v: round(medians[v] / medians["bare"], 3) for v in ("gradnorm", "fixed")},
        "part_median_cpu_seconds": {
            v: {k: round(median([s[k] for s in split[v][skip:]]), 3) for k in parts[v]}
            for v in ("gradnorm", "fixed")
        },
        "cpu_seconds": {v: [round(x, 3) for x in cpu[v]] for v in VARIANTS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", type=Path, help="copy tokens/ and tokenizers/ from it")
    parser.add_argument("--size", default="small", help="model preset")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs, the worker's CPUs")
    parser.add_argument(
        "--buckets", default=",".join(SHORT_BUCKETS), help="comma-separated, or 'all'"
    )
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the trainer's parts in this process, step-interleaved (CPU seconds)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="more config overrides, e.g. train.zero_stage=0 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "trainer_overhead.json")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (CPU seconds are taken between step ends)")

    set_environment()
    import ray

    load_before = machine()
    workdir = Path(tempfile.mkdtemp(prefix="trainer-overhead-"))
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        ray.init(address="local", num_cpus=args.cpus, object_store_memory=256 * 2**20,
                 include_dashboard=False, logging_level="WARNING")  # fmt: skip
        workspace = prepare_workspace(args.workspace, workdir / "ws")
        bare_config = config_for(workspace, args, "fixed")
        inputs = train_inputs(bare_config)
        for attempt in range(args.repeats):
            shift = attempt % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                load = machine()["load_average"][0]
                if variant == "bare":
                    result = bare_run(bare_config, inputs)
                else:
                    fresh = workdir / f"{variant}-{attempt}"
                    for part in ("tokens", "tokenizers"):
                        shutil.copytree(workspace / part, fresh / part)
                    result = trainer_run(config_for(fresh, args, variant))
                    shutil.rmtree(fresh, ignore_errors=True)
                result["load_average_1min"] = load
                runs[variant].append(result)
                print(
                    f"repeat {attempt} {variant}: step seconds "
                    f"{', '.join(f'{s:.2f}' for s in result['step_seconds'])}; CPU seconds "
                    f"{', '.join(f'{s:.2f}' for s in result['cpu_seconds'])} (load {load})",
                    flush=True,
                )
        ray.shutdown()
        local = interleaved(workdir, workspace, args) if args.in_process else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def pooled(variant: str, key: str, skip: int) -> list[float]:
        return [s for run in runs[variant] for s in run[key][skip:]]

    wall = {v: median(pooled(v, "step_seconds", args.warmup)) for v in VARIANTS}
    cpu = {v: median(pooled(v, "cpu_seconds", args.warmup - 1)) for v in VARIANTS}
    first_loss = {v: round(runs[v][0]["loss"][0], 5) for v in VARIANTS}
    ratio = wall["gradnorm"] / wall["bare"]
    train = bare_config.train
    result = {
        "name": "trainer_overhead",
        "unit": "seconds per optimizer step (median)",
        "value": round(wall["gradnorm"], 4),
        "baseline": round(wall["bare"], 4),
        "ratio": round(ratio, 4),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "headline": "omni train (1 CPU worker, GradNorm, the default) vs the bare loop",
        "fixed_weights": {
            "value": round(wall["fixed"], 4),
            "ratio": round(wall["fixed"] / wall["bare"], 4),
        },
        "cpu_seconds_per_step": {
            "medians": {v: round(cpu[v], 3) for v in VARIANTS},
            "ratios": {v: round(cpu[v] / cpu["bare"], 3) for v in ("gradnorm", "fixed")},
        },
        "step1_loss": first_loss,
        "same_step1_loss": len(set(first_loss.values())) == 1,
        "in_process": local,
        "settings": {
            "model": args.size,
            "micro_batch_size": train.micro_batch_size,
            "grad_accum": train.grad_accum,
            "buckets": sorted(inputs.weights),
            "steps_per_run": train.max_steps,
            "warmup_steps_left_out": args.warmup,
            "repeats": args.repeats,
            "cpus_per_worker": train.cpus_per_worker,
            "zero_stage": train.zero_stage,
            "workspace": str(args.workspace) if args.workspace else "built from examples/corpus",
        },
        "runs": {v: [rounded(r) for r in runs[v]] for v in VARIANTS},
        "load_before": load_before,
        "load_after": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"trainer (GradNorm) {wall['gradnorm']:.3f} s/step, fixed weights {wall['fixed']:.3f}, "
        f"bare loop {wall['bare']:.3f}: ratio {ratio:.3f}x (fixed "
        f"{wall['fixed'] / wall['bare']:.3f}x), target <= {TARGET_RATIO}x; CPU s/step ratio "
        f"{cpu['gradnorm'] / cpu['bare']:.3f}x; load {load_before['load_average']} -> "
        f"{result['load_after']['load_average']}; written to {args.out}"
    )
    if local is not None:
        print(f"in-process CPU s/step: {json.dumps(local['median_cpu_seconds'])}, parts "
              f"{json.dumps(local['part_median_cpu_seconds'])}")  # fmt: skip


if __name__ == "__main__":
    main()
