"""The training loop of one data-parallel rank: ``train()`` -> ``train_step()`` -> forward/backward.

Runs inside a Ray Train worker (``train_worker``), where the process group already exists,
and drives a DeepSpeed engine built around :class:`~training.objective.Objective` with a
plain ``torch.optim.AdamW`` (no DeepSpeed op is compiled, on CPU or GPU).

One optimizer step = ``grad_accum`` micro-batches, each from one bucket in the schedule's
order. Before the first backward, the window's micro-batches are corrupted and their
scored tokens counted; one all-reduce gives every rank the window totals (and rank 0's
stop / fenced flags), so each term is normalised by its tokens over the whole window on
every rank. After the step a second all-reduce gathers the loss sums, per-bucket losses
and GradNorm's squared gradient norms for logging and for the loss weights.

Everything random is derived from ``(seed, step, place in the global batch)`` or restored
from the checkpoint, so a run resumed from a checkpoint repeats the uninterrupted run's
steps bit for bit on CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from infra.storage import Storage, StorageConfig, join
from infra.worker_log import worker_log
from tokenization.vocab import VocabLayout
from training.batch_source import BatchSource, SourcePosition, SourceSettings
from training.checkpointing import (
    MODEL_DIR,
    TRAINER_STATE,
    CheckpointWriter,
    WeightsOnlyCheckpointEngine,
    fetch_local,
    gathered_state_dict,
    latest_complete,
    needed_to_resume,
    rank_file,
    rng_state,
    set_rng_state,
    step_name,
)
from training.deepspeed_config import deepspeed_config, trainer_clips
from training.dfm import PathConfig, build_path
from training.gradnorm import FixedWeights, GradNorm
from training.learning_rate import lr_lambda
from training.model import MEDIA, OmniModel
from training.model_config import ModelConfig
from training.objective import Objective, Prepared, window_scales
from training.run_control import FencedOff, RunControl
from training.step_log import StepLog
from training.train_config import LOSS_TERMS, WINDOW_TERMS, TrainConfig
from training.validation import Validation, first_eval_samples

log = logging.getLogger(__name__)


@dataclass
class WorkerPlan:
    """Everything a rank needs, as plain data the driver ships through Ray."""

    run_id: str
    tracking_uri: str
    owner: str
    run_dir: str
    storage: dict[str, Any]
    model: dict[str, Any]
    objective: str
    path: dict[str, Any]
    layout: dict[str, Any]
    codebooks: dict[str, np.ndarray]
    train: dict[str, Any]
    shards: dict[str, list[str]]  # per bucket, the tars holding train samples
    eval_shards: dict[str, list[str]]  # per bucket, the tars holding eval samples
    shard_samples: dict[str, int]  # samples per shard URI (the tokens manifest's counts)
    weights: dict[str, float]
    fingerprints: dict[str, str]
    progress: Any = None  # a Ray actor rank 0 posts each step to (the driver's progress bar)
    log_dir: str = ""  # each rank's full log goes to <log_dir>/rank-<r>.log ("" = none)


@dataclass
class StepResult:
    """What one optimizer step measured (already reduced over ranks)."""

    metrics: dict[str, float]
    stop: bool
    fenced: bool


def train_worker(plan: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one rank of the run."""
    import ray.train

    if not plan["train"]["use_gpu"]:
        _cpu_collectives()
    context = ray.train.get_context()
    worker = WorkerPlan(**plan)
    rank = context.get_world_rank()
    with ExitStack() as stack:
        if worker.log_dir:
            storage = Storage(StorageConfig.model_validate(worker.storage))
            stack.enter_context(worker_log(storage, worker.log_dir, rank))
        Trainer(worker, rank, context.get_world_size()).train()


def _brief(metrics: dict[str, float]) -> str:
    """A step's metrics on one line of the worker log, most significant digits only."""
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _cpu_collectives() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    DeepSpeed builds that op (about 45 s of C++ compilation, STACK-NOTES) when its torch
    backend starts, only to speed up CPU all-reduces within one node. CPU training here is
    for development and tests and runs on gloo, which needs no op; GPUs use NCCL.
    """
    import importlib
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # ``deepspeed.comm.torch`` as an attribute is the torch package: go through the module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and machines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class Trainer:
    """One rank's view of the run: engine, data, loss weights, checkpoints, metrics."""

    def __init__(self, plan: WorkerPlan, rank: int, world: int) -> None:
        self.plan, self.rank, self.world = plan, rank, world
        self.cfg = TrainConfig.model_validate(plan.train)
        self.storage = Storage(StorageConfig.model_validate(plan.storage))
        self.device = self._device()
        self.control = RunControl(self.storage, plan.run_dir)
        self.step = 0

    def _device(self) -> torch.device:
        if self.cfg.use_gpu and torch.cuda.is_available():
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        import deepspeed

        plan, cfg = self.plan, self.cfg
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        layout = VocabLayout(**plan.layout)
        # A copy: arrays from Ray's object store are read-only (torch warns on them).
        codebooks = {m: torch.tensor(np.asarray(plan.codebooks[m])) for m in MEDIA}
        self.model = OmniModel(ModelConfig.model_validate(plan.model), layout, codebooks)
        path_cfg = PathConfig.model_validate(plan.path)
        path = None
        if plan.objective == "dfm":
            vectors = {**codebooks, "text": self.model.backbone.embed_tokens.weight.detach()}
            path = build_path(path_cfg, layout, vectors if path_cfg.path == "metric" else None)
        align = cfg.alignment_temperature if cfg.alignment_weight > 0 else None
        self.objective = Objective(self.model, plan.objective, path, path_cfg.loss, align)
        optimizer = torch.optim.AdamW(
            self._param_groups(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        ds_config = deepspeed_config(cfg, self.world)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.objective,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.zero_stage = self.engine.zero_optimization_stage()
        self.clip_here = trainer_clips(ds_config) and cfg.grad_clip > 0
        self.grad_norm: float | None = None
        if self.world == 1:
            # An all-reduce over one rank is the identity, yet DeepSpeed would still flatten
            # and copy every gradient into a bucket for it.
            self.engine.enable_backward_allreduce = False
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine(None)
        # DeepSpeed copies its zero_to_fp32.py / zero_to_torch.py into every ZeRO checkpoint;
        # both unpickle (torch.load(weights_only=False)). The checkpoint's model/ folder is
        # already the consolidated safetensors, so no checkpoint of ours carries them.
        self.engine._copy_recovery_script = lambda save_path: None
        terms = [t for t in LOSS_TERMS if plan.objective == "dfm" or t == "ce"]
        initial = {t: cfg.loss_weights[t] for t in terms}
        self.weighting: GradNorm | FixedWeights = (
            GradNorm(terms, initial, cfg.gradnorm_alpha, cfg.gradnorm_lr)
            if cfg.loss_weighting == "gradnorm"
            else FixedWeights(initial)
        )
        self.buckets = sorted(plan.weights)
        resume_step, attempt = self._start_point()
        start = self._restore(resume_step) if resume_step is not None else None
        self.source = BatchSource(
            SourceSettings(
                shards=plan.shards,
                weights=plan.weights,
                seed=cfg.seed,
                rank=self.rank,
                world=self.world,
                micro_batch_size=cfg.micro_batch_size,
                pad_id=layout.special_id("<PAD>"),
                dgs_block=cfg.dgs_block if plan.objective == "dfm" else None,
                max_length=cfg.max_length,
                prefetch=cfg.prefetch,
                storage_options=self._storage_options(),
                shard_samples=plan.shard_samples or None,
            ),
            start,
        )
        self.validation = self._validation(layout)
        self.writer = CheckpointWriter(
            self.storage,
            plan.run_dir,
            self.rank,
            self.world,
            cfg.keep_last,
            attempt=attempt,
            on_complete=self._on_checkpoint,
            on_removed=self._on_pruned,
        )
        self.log = StepLog(plan.tracking_uri, plan.run_id) if self.rank == 0 else None
        if self.log is not None:
            self.log.set_tag("deepspeed.zero_stage", str(self.zero_stage))
            if self.zero_stage != cfg.zero_stage:
                log.info("one rank: ZeRO stage %d partitions nothing, DeepSpeed runs at stage "
                         "%d", cfg.zero_stage, self.zero_stage)  # fmt: skip

    def _validation(self, layout: VocabLayout) -> Validation | None:
        """The eval split's first samples of every bucket (None when ``eval_every`` is 0)."""
        cfg = self.cfg
        if cfg.eval_every == 0:
            return None
        options = self._storage_options()
        samples = {
            bucket: first_eval_samples(urls, cfg.eval_samples, cfg.max_length, options)
            for bucket, urls in sorted(self.plan.eval_shards.items())
        }
        validation = Validation(
            samples, self.rank, self.world, cfg.micro_batch_size, layout.special_id("<PAD>"),
            cfg.dgs_block if self.plan.objective == "dfm" else None, cfg.seed,
        )  # fmt: skip
        return validation if validation else None

    def validate(self) -> dict[str, float]:
        """Held-out loss of the current weights on the eval split (every rank takes part)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            sums = self.validation.sums(self.objective, self.engine, self.device)
        finally:
            module.train(was_training)
        return self.validation.metrics(self._all_reduce(sums))

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms and 1-d parameters."""
        decay, no_decay = [], []
        for _, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _storage_options(self) -> dict[str, Any] | None:
        first = next((s for shards in self.plan.shards.values() for s in shards), "")
        return self.storage.stream_options(first) if first.startswith("s3://") else None

    def _start_point(self) -> tuple[int | None, str]:
        """Where this worker group starts, as rank 0 finds it, the same on every rank: the
        run's latest complete checkpoint (None: a new run), and a token of this attempt.

        A group started by ``omni train``, by ``--resume`` or by Ray Train after a lost
        worker or node (``train.max_failures``) resumes through the same code, from the
        last checkpoint that every rank finished.
        """
        found = [-1, 0]
        if self.rank == 0:
            latest = latest_complete(self.storage, self.plan.run_dir)
            found = [-1 if latest is None else latest, int.from_bytes(os.urandom(6), "big")]
        shared = torch.tensor(found, dtype=torch.int64, device=self.device)
        dist.broadcast(shared, src=0)
        step, attempt = (int(v) for v in shared.tolist())
        return (None if step < 0 else step), f"{attempt:012x}"

    def _restore(self, step: int) -> SourcePosition:
        """Load the checkpoint of ``step``: engine, rank state, RNG, loss weights."""
        uri = join(self.plan.run_dir, step_name(step))
        # From s3://, a copy of this rank's files and the shared ones only: gone after.
        with tempfile.TemporaryDirectory(prefix="omni-resume-") as scratch:
            mine = functools.partial(needed_to_resume, rank=self.rank)
            local = fetch_local(self.storage, uri, Path(scratch), mine)
            self.engine.load_checkpoint(
                str(local.parent), tag=local.name, load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )  # fmt: skip
            trainer = json.loads((local / TRAINER_STATE).read_text())
            mine = json.loads((local / rank_file(self.rank)).read_text())
        if trainer["world"] != self.world:
            raise ValueError(
                f"checkpoint {uri} was written by {trainer['world']} workers, this run has "
                f"{self.world}: resume with train.num_workers={trainer['world']}"
            )
        set_rng_state(mine["rng"])
        self.weighting.load_state_dict(trainer["weighting"])
        self.step = int(trainer["step"])
        return SourcePosition(mine["schedule"], mine["streams"])

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        self.setup()
        try:
            while self.step < self.cfg.max_steps:
                result = self.train_step(self.step + 1)
                if result.fenced:
                    raise FencedOff(f"run {self.plan.run_id} is owned by another omni train")
                self.step += 1
                last = self.step == self.cfg.max_steps
                validate = self.validation is not None and (
                    last or self.step % self.cfg.eval_every == 0
                )
                if validate:
                    result.metrics.update(self.validate())
                if validate or last or self.step % self.cfg.log_every == 0:
                    log.info("step %d: %s", self.step, _brief(result.metrics))
                    if self.log is not None:
                        self.log.log(self.step, result.metrics)
                if self.rank == 0 and self.plan.progress is not None:
                    self._post_progress(result.metrics)
                if result.stop or last or self.step % self.cfg.checkpoint_every == 0:
                    self.checkpoint()
                if result.stop:
                    break
            self.writer.wait()
        finally:
            self.writer.close()
            self.source.close()
            if self.log is not None:
                self.log.close()

    def _post_progress(self, metrics: dict[str, float]) -> None:
        """Post the step's loss and throughput to the driver's bar; never waits for it."""
        headline = ("train/loss", "train/tokens_per_s")
        self.plan.progress.post.remote(self.step, {k: metrics[k] for k in headline if k in metrics})

    def _control_flags(self) -> tuple[float, float]:
        """(stop, fenced) as rank 0 reads them; other ranks learn them in the all-reduce."""
        if self.rank != 0:
            return 0.0, 0.0
        state = self.control.read()
        if state is None or state.owner != self.plan.owner:
            return 0.0, 1.0
        return float(state.stop), 0.0

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """The corruption draws of micro-batch ``micro`` of ``step`` on this rank.

        Seeded by the micro-batch's place in the step's global batch (micro-batch-major,
        then rank), so the same global batch is corrupted alike whether it is spread over
        ranks or accumulated on fewer: 2 ranks x accumulation 1 and 1 rank x accumulation 2
        see the same draws.
        """
        generator = torch.Generator(device=self.device)
        index = micro * self.world + self.rank
        generator.manual_seed(_seed(self.cfg.seed, step, index))
        return generator

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches."""
        cfg, started = self.cfg, time.perf_counter()
        batches, waited = [], 0.0
        for _ in range(cfg.grad_accum):
            before = time.perf_counter()
            batches.append(next(self.source))
            waited += time.perf_counter() - before
        prepared = [
            self.objective.prepare(b.to(self.device), self._generator(step, m))
            for m, b in enumerate(batches)
        ]
        stop, fenced = self._control_flags()
        window = [sum(p.counts.get(t, 0) for p in prepared) for t in WINDOW_TERMS]
        head = self._all_reduce([*window, stop, fenced])
        totals = dict(zip(WINDOW_TERMS, head[: len(WINDOW_TERMS)], strict=True))
        if head[-1] > 0:
            return StepResult({}, stop=False, fenced=True)
        scales = window_scales(totals, self.world, cfg.grad_accum)
        weights = {**self.weighting.weights, "align": cfg.alignment_weight}
        lr = float(self.optimizer.param_groups[0]["lr"])
        sums, squares = dict.fromkeys(WINDOW_TERMS, 0.0), dict.fromkeys(WINDOW_TERMS, 0.0)
        bucket_ce = {b: [0.0, 0.0] for b in self.buckets}
        for item in prepared:
            self._forward_backward(item, totals, scales, weights, sums, squares, bucket_ce)
        real = sum(b.real_tokens for b in batches)
        grid = sum(b.ids.numel() for b in batches)
        tail = self._all_reduce(
            [sums[t] for t in WINDOW_TERMS]
            + [squares[t] for t in WINDOW_TERMS]
            + [v for b in self.buckets for v in bucket_ce[b]]
            + [real, grid, waited]
        )
        n = len(WINDOW_TERMS)
        losses = {t: tail[i] for i, t in enumerate(WINDOW_TERMS) if totals[t] > 0}
        norms = {t: math.sqrt(tail[n + i]) for i, t in enumerate(LOSS_TERMS) if totals[t] > 0}
        if isinstance(self.weighting, GradNorm):
            self.weighting.update(losses, norms)
        seconds = time.perf_counter() - started
        metrics = {
            "train/loss": sum(weights[t] * v for t, v in losses.items() if t in weights),
            "train/lr": lr,
            "train/supervised_tokens_per_s": totals["ce"] / seconds,
            "train/tokens_per_s": tail[-3] / seconds,
            "train/padding_fraction": 1.0 - tail[-3] / max(1.0, tail[-2]),
            "train/step_seconds": seconds,
            "train/data_wait_fraction": tail[-1] / self.world / seconds,
        }
        grad_norm = self.grad_norm if self.clip_here else self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update({f"train/loss_{t}": v for t, v in losses.items()})
        # This rank's corrupt members, tars and over-long samples skipped so far, by reason.
        metrics.update({f"data/skipped_{k}": float(v) for k, v in self.source.skipped().items()})
        metrics.update({f"gradnorm/weight_{t}": w for t, w in self.weighting.weights.items()})
        if isinstance(self.weighting, GradNorm):
            metrics.update({f"gradnorm/grad_norm_{t}": v for t, v in norms.items()})
        offset = 2 * n
        for i, bucket in enumerate(self.buckets):
            total, count = tail[offset + 2 * i], tail[offset + 2 * i + 1]
            if count > 0:
                metrics[f"train/loss_ce_{bucket}"] = total / count
        return StepResult(metrics, stop=head[-2] > 0, fenced=False)

    def _forward_backward(
        self,
        item: Prepared,
        totals: dict[str, float],
        scales: dict[str, float],
        weights: dict[str, float],
        sums: dict[str, float],
        squares: dict[str, float],
        bucket_ce: dict[str, list[float]],
    ) -> None:
        batch = item.batch
        terms, hidden, anchor = self.engine(
            item.inputs, batch.attention_mask, batch.instruction_lengths, item.targets,
            item.scored, item.t, item.pairs,
        )  # fmt: skip
        loss = anchor
        for term, value in terms.items():
            # Every term enters the graph, a term with no token in the window at scale 0:
            # each rank then runs the same backward through the same modules (ZeRO-3).
            loss = loss + weights.get(term, 0.0) * scales.get(term, 0.0) * value
        if isinstance(self.weighting, GradNorm):
            self._measure_gradients(item, hidden, totals, squares)
        self.engine.backward(loss)
        if self.clip_here and self.engine.is_gradient_accumulation_boundary():
            params = self.engine.module.parameters()
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        self.engine.step()
        for term, value in terms.items():
            if totals[term]:
                sums[term] += float(value.detach()) / totals[term]
        bucket_ce[batch.bucket][0] += float(terms["ce"].detach())
        bucket_ce[batch.bucket][1] += item.counts["ce"]

    def _measure_gradients(
        self, item: Prepared, hidden: Tensor, totals: dict[str, float], squares: dict[str, float]
    ) -> None:
        """Add each term's squared gradient norm at the shared hidden state (GradNorm's G_i).

        Runs on every rank for every micro-batch, tokens or not: under ZeRO-3 the gather of
        the heads is a collective.
        """
        shared = hidden.detach().requires_grad_(True)
        with self._gathered_heads():
            terms = self.objective.term_sums(
                shared, item.inputs, item.targets, item.scored, item.t, detached_heads=True
            )
            for term, value in terms.items():
                if not totals[term]:
                    continue
                (grad,) = torch.autograd.grad(value / totals[term], shared, retain_graph=True)
                squares[term] += float(grad.float().pow(2).sum())

    def _gathered_heads(self) -> AbstractContextManager[Any]:
        """Under ZeRO-3 the heads' weights are partitioned: gather them to read them."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        heads = [self.model.head(g) for g in self.model.groups.names]
        heads += list(self.model.reconstruction.values())
        params = [p for layer in heads for p in layer.parameters()]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Save step ``self.step`` on every rank; rank 0 marks it complete when all are done."""
        self.writer.wait()
        step, root = self.step, self.writer.local_run_dir()
        folder = self.writer.local_step_dir(step)
        self.engine.save_checkpoint(
            str(root), tag=step_name(step), client_state={"step": step}, save_latest=False
        )
        position = self.source.position
        mine = {"step": step, "streams": position.streams, "schedule": position.schedule,
                "rng": rng_state()}  # fmt: skip
        (folder / rank_file(self.rank)).write_text(json.dumps(mine))
        self._save_consolidated(folder / MODEL_DIR)
        if self.rank == 0:
            trainer = {
                "step": step,
                "world": self.world,
                "weighting": self.weighting.state_dict(),
                "fingerprints": self.plan.fingerprints,
                "skipped": dict(self.source.skipped()),
            }
            (folder / TRAINER_STATE).write_text(json.dumps(trainer, indent=2))
        self.writer.finish(step, barrier=dist.barrier)
        log.info("checkpoint of step %d written (rank %d)", step, self.rank)

    def _save_consolidated(self, folder: Path) -> None:
        """``OmniModel.save`` of the full weights, rank 0 writes; under ZeRO-3 every rank
        first gathers them one submodule at a time (never the whole model at once)."""
        if self.zero_stage == 3:
            state = gathered_state_dict(self.model, self.rank)
            if state is not None:
                self.model.save(folder, state)
        elif self.rank == 0:
            self.model.save(folder)

    def _on_checkpoint(self, step: int, uri: str) -> None:
        if self.log is not None:
            self.log.set_tag("checkpoint.latest", uri)
            self.log.set_tag(f"checkpoint.{step_name(step)}", uri)

    def _on_pruned(self, step: int) -> None:
        if self.log is not None:
            self.log.delete_tag(f"checkpoint.{step_name(step)}")
