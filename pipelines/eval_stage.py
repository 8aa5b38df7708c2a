"""``omni eval`` / ``omni sweep`` / ``omni generate``: evaluation of training checkpoints.

The pattern is img2dataset's "the shard is the unit of work", with a checkpoint as the
shard: :func:`sweep` lists the complete checkpoints of an experiment's training runs,
drops those with a done record, and evaluates the rest in step order, each under an
exclusive, leased claim (``evaluation.claims``) so that concurrent or repeated sweeps
evaluate every checkpoint exactly once; a failure is retried up to
``eval.sweep.max_attempts`` times, then recorded as failed. Every evaluation is a child
MLflow run of the training run, its headline metrics mirrored into the training run as
``eval/<metric>`` at the checkpoint's step. Tasks themselves live in
``evaluation.tasks`` and know nothing of MLflow or claims.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluation.anytoany import (
    check_task,
    decoded_file,
    encode_input,
    generate_batch,
    instruction,
    media_tokens_for,
    without_dgs,
)
from evaluation.checkpoint import (
    EvalInputError,
    LoadedCheckpoint,
    RunInfo,
    load_checkpoint,
    pick_device,
    resolve_step,
    run_dir,
    run_info,
)
from evaluation.claims import ClaimStore, Exhausted
from evaluation.config import SuiteConfig
from evaluation.eval_data import load_samples
from evaluation.report import (
    SCORES,
    SUMMARY,
    category_scores,
    csv_table,
    headline_metrics,
    markdown_table,
    plot_sweep,
)
from evaluation.tasks import TASKS, TaskContext, TaskResult
from infra.config import public_dict
from infra.storage import Storage, is_remote, join
from infra.tracking import Tracker, open_experiment
from pipelines.corpus import absolute
from pipelines.train.stage import first_line
from tokenization.bundle import Tokenizers
from tokenization.vocab import VocabLayout
from training.checkpointing import MODEL_DIR, complete_steps, step_name

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

STAGE = "eval"
log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """One evaluated checkpoint: its child run, metrics, and which are headline."""

    run_id: str
    step: int
    suite: str
    child_run_id: str
    metrics: dict[str, float]
    headline: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SweepReport:
    """What a sweep did: counts, one row per evaluated checkpoint in scope, the report."""

    experiment: str | None
    suite: str
    evaluated: int
    skipped: int  # runs left out with a reason (not a train run, no checkpoint, layout)
    failed: int
    rows: list[dict[str, Any]]
    table_markdown: str
    plot_path: str | None
    report_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    already_done: int = 0  # checkpoints in scope with a done record before this sweep


class Session:
    """What evaluations of one command share: storage, MLflow client, tokenizers, samples."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.storage = Storage(config.storage)
        self.workspace = absolute(config.workspace)
        if is_remote(self.workspace):  # a long-running sweep must see new checkpoints
            fs, path = self.storage.filesystem(self.workspace)
            fs.invalidate_cache(path)
        self.client, self.experiment_id = open_experiment(config.mlflow, self.workspace)
        self._tokenizers: Tokenizers | None = None
        self._samples: dict[str, dict[str, list]] = {}
        self._runs: dict[str, RunInfo] = {}

    @property
    def tokenizers(self) -> Tokenizers:
        if self._tokenizers is None:
            uri = join(self.workspace, "tokenizers")
            if not self.storage.exists(join(uri, "vocab_layout.json")):
                raise EvalInputError(f"no tokenizers in {uri}: run omni tokenizers train")
            self._tokenizers = Tokenizers.load_uri(self.storage, uri)
        return self._tokenizers

    def run(self, run_id: str) -> RunInfo:
        if run_id not in self._runs:
            self._runs[run_id] = run_info(self.client, run_id)
        return self._runs[run_id]

    def samples(self, name: str, suite: SuiteConfig) -> dict[str, list]:
        """The suite's samples of every bucket its tasks read, loaded once."""
        if name not in self._samples:
            buckets = {b for task in suite.tasks for b in TASKS[task].BUCKETS}
            self._samples[name] = load_samples(
                self.storage,
                self.workspace,
                buckets,
                suite.split,
                suite.samples,
                self.tokenizers.layout,
            )
        return self._samples[name]

    def load(self, run_id: str, step: int | None, suite: SuiteConfig) -> LoadedCheckpoint:
        run = self.run(run_id)
        step = resolve_step(self.storage, self.workspace, run_id, step)
        return load_checkpoint(
            self.storage,
            self.workspace,
            run,
            step,
            self.tokenizers,
            pick_device(suite.device, suite.cpu_threads),
        )


def suite_config(config: PipelineConfig, suite: str | None) -> tuple[str, SuiteConfig]:
    name = suite or "default"
    try:
        return name, config.eval.suite(name)
    except KeyError as error:
        raise EvalInputError(str(error.args[0])) from None


def mirrored_name(metric: str, suite: str) -> str:
    """The training run's copy of a headline metric: ``eval/<metric>`` for the default
    suite, ``eval/<suite>/<metric>`` for the others (so suites never share a curve)."""
    return f"eval/{metric}" if suite == "default" else f"eval/{suite}/{metric}"


# ---------------------------------------------------------------------------- one checkpoint


def run_tasks(loaded: LoadedCheckpoint, suite: SuiteConfig, samples: dict[str, list]) -> TaskResult:
    """Every task of ``suite`` on one loaded checkpoint, merged into one result."""
    context = TaskContext(loaded, suite, samples, int(loaded.run.train.get("dgs_block", 32)))
    merged = TaskResult()
    for name in suite.tasks:
        result = TASKS[name].run(context)
        merged.metrics.update(result.metrics)
        merged.headline += result.headline
        merged.artifacts.update(result.artifacts)
        merged.notes += result.notes
    scores = category_scores(merged.metrics)
    merged.metrics.update(scores)
    merged.headline = [*scores, *merged.headline]
    return merged


def _evaluate(
    session: Session, run_id: str, step: int | None, suite_name: str, attempt: int = 1
) -> EvalResult:
    started = time.time()
    suite = session.config.eval.suite(suite_name)
    loaded = session.load(run_id, step, suite)
    samples = session.samples(suite_name, suite)
    client, run = session.client, loaded.run
    tags = {
        "mlflow.parentRunId": run_id,
        "omni.stage": STAGE,
        "eval.checkpoint_step": str(loaded.step),
        "eval.suite": suite_name,
        "eval.status": "RUNNING",
        "eval.attempt": str(attempt),
        "eval.checkpoint": loaded.uri,
    }
    child = client.create_run(
        run.experiment_id, run_name=f"eval-{suite_name}-{step_name(loaded.step)}", tags=tags
    )
    tracker = Tracker(client, child.info.run_id)
    try:
        tracker.log_params(public_dict(suite), prefix="eval.")
        result = run_tasks(loaded, suite, samples)
        tracker.log_metrics(result.metrics, step=loaded.step)
        for name, data in sorted(result.artifacts.items()):
            folder, _, file = name.rpartition("/")
            tracker.log_bytes(data, file, folder or None)
        if result.notes:
            tracker.log_bytes("\n".join(result.notes).encode(), "notes.txt")
    except BaseException as error:
        tracker.set_tags({"eval.status": "FAILED", "error": first_line(error)[:5000]})
        client.set_terminated(child.info.run_id, "FAILED")
        raise
    headline = [m for m in result.headline if m in result.metrics]
    Tracker(client, run_id).log_metrics(
        {mirrored_name(m, suite_name): result.metrics[m] for m in headline}, step=loaded.step
    )
    tracker.set_tags({"eval.status": "FINISHED"})
    client.set_terminated(child.info.run_id, "FINISHED")
    return EvalResult(
        run_id,
        loaded.step,
        suite_name,
        child.info.run_id,
        result.metrics,
        headline,
        result.notes,
        round(time.time() - started, 2),
    )


def evaluate(
    config: PipelineConfig, run_id: str, step: int | None = None, suite: str | None = None
) -> EvalResult:
    """``omni eval``: evaluate one checkpoint (the latest complete one by default)."""
    name, _ = suite_config(config, suite)
    return _evaluate(Session(config), run_id, step, name)


def evaluate_checkpoint(
    config: PipelineConfig, run_id: str, step: int, suite: str | None = None
) -> dict[str, float]:
    """Evaluate checkpoint ``step`` of ``run_id`` with ``suite``; its metrics."""
    return evaluate(config, run_id, step, suite).metrics


# ---------------------------------------------------------------------------- sweeps


@dataclass
class _Candidate:
    run_id: str
    run_name: str
    start_time: int
    steps: list[int]


def _train_runs(
    session: Session, experiment: str | None, run_ids: list[str] | None, notes: list[str]
) -> tuple[list[_Candidate], int]:
    """The training runs in scope with their complete checkpoints; (runs, runs skipped)."""
    from mlflow.exceptions import MlflowException

    client, found, skipped = session.client, [], 0
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                notes.append(f"run {run_id}: unknown run id, skipped")
                skipped += 1
    else:
        name = experiment or session.config.mlflow.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise EvalInputError(f"no MLflow experiment named {name!r} at {client.tracking_uri}")
        runs, token = [], None
        while True:
            page = client.search_runs(
                [exp.experiment_id],
                "tags.`omni.stage` = 'train'",
                max_results=1000,
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token:
                break
    for run in runs:
        run_id = run.info.run_id
        if run.data.tags.get("omni.stage") != "train":
            notes.append(f"run {run_id}: not an omni train run, skipped")
            skipped += 1
            continue
        steps = complete_steps(session.storage, run_dir(session.workspace, run_id))
        if not steps:
            notes.append(f"run {run_id}: no complete checkpoint yet, skipped")
            skipped += 1
            continue
        found.append(
            _Candidate(run_id, run.info.run_name or run_id, int(run.info.start_time or 0), steps)
        )
    return found, skipped


def _bad_run(session: Session, candidate: _Candidate, step: int) -> str | None:
    """Why a run cannot be evaluated at all (checked before claiming), or None."""
    try:
        session.run(candidate.run_id)
        uri = join(
            run_dir(session.workspace, candidate.run_id),
            step_name(step),
            MODEL_DIR,
            "vocab_layout.json",
        )
        data = json.loads(session.storage.read_bytes(uri))
        data.pop("fingerprint", None)
        layout = VocabLayout(**{**data, "specials": tuple(data["specials"])})
        session.tokenizers.layout.check_same(layout, f"checkpoint {step_name(step)}")
    except (EvalInputError, ValueError, FileNotFoundError) as error:
        return str(error)
    return None


def sweep(
    config: PipelineConfig,
    experiment: str | None = None,
    run_ids: list[str] | None = None,
    suite: str | None = None,
) -> SweepReport:
    """Evaluate every complete, not yet evaluated checkpoint of the experiment's training
    runs (or of ``run_ids``) once, in step order; then write the report."""
    started = time.time()
    settings = config.eval.sweep
    suite_name, _ = suite_config(config, suite or settings.suite)
    session = Session(config)
    store = ClaimStore(
        session.storage, session.workspace, suite_name, settings.lease_s, settings.max_attempts
    )
    notes: list[str] = []
    candidates, skipped = _train_runs(session, experiment, run_ids, notes)
    pending, already_done = [], 0
    for candidate in candidates:
        done = store.done_steps(candidate.run_id)
        already_done += len(set(done) & set(candidate.steps))
        pending += [
            (step, candidate.start_time, candidate) for step in candidate.steps if step not in done
        ]
    pending.sort(key=lambda item: (item[0], item[1]))
    evaluated = failed = 0
    bad: dict[str, str] = {}
    for step, _, candidate in pending:
        if candidate.run_id not in bad:
            reason = _bad_run(session, candidate, step)
            if reason is not None:
                bad[candidate.run_id] = reason
                notes.append(f"run {candidate.run_id}: {reason}; skipped")
                log.warning("sweep skips run %s: %s", candidate.run_id, reason)
                skipped += 1
        if candidate.run_id in bad:
            continue
        outcome = _claimed_evaluation(session, store, candidate, step, suite_name, notes)
        evaluated += outcome == "finished"
        failed += outcome == "failed"
    scope = {c.run_id: c.run_name for c in candidates}
    rows = []
    for record in store.all_done():
        if record["run_id"] in scope:
            rows.append({**record, "run_name": scope[record["run_id"]]})
    report = SweepReport(
        experiment=experiment or (None if run_ids else config.mlflow.experiment),
        suite=suite_name,
        evaluated=evaluated,
        skipped=skipped,
        failed=failed,
        rows=sorted(rows, key=lambda r: (r["run_id"], r["step"])),
        table_markdown=markdown_table(rows, [m for m in SUMMARY if _any_has(rows, m)]),
        plot_path=None,
        notes=notes,
        already_done=already_done,
    )
    _write_report(session, report, changed=bool(evaluated or failed))
    report.seconds = round(time.time() - started, 2)
    return report


def _any_has(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(metric in row.get("metrics", {}) for row in rows)


def _claimed_evaluation(
    session: Session,
    store: ClaimStore,
    candidate: _Candidate,
    step: int,
    suite: str,
    notes: list[str],
) -> str:
    """Claim and evaluate one checkpoint, retrying; "finished", "failed" or "" (not ours)."""
    while True:
        claim = store.claim(candidate.run_id, step)
        if claim is None:
            return ""
        if isinstance(claim, Exhausted):
            record = {"status": "failed", "suite": suite, "errors": claim.errors, "metrics": {}}
            if store.finish(candidate.run_id, step, record):
                notes.append(
                    f"run {candidate.run_id} {step_name(step)}: failed after "
                    f"{len(claim.errors)} attempts: {claim.errors[-1]}"
                )
                return "failed"
            return ""
        try:
            with store.heartbeat(claim):
                result = _evaluate(session, candidate.run_id, step, suite, claim.attempt)
        except Exception as error:
            message = first_line(error)
            steps = complete_steps(session.storage, run_dir(session.workspace, candidate.run_id))
            if step not in steps:  # keep_last pruned it meanwhile: nothing left to evaluate
                store.record_error(claim, message)
                record = {"status": "pruned", "suite": suite, "errors": [message], "metrics": {}}
                store.finish(candidate.run_id, step, record)
                notes.append(f"run {candidate.run_id} {step_name(step)}: pruned by training")
                return ""
            log.warning(
                "evaluation of %s %s failed (attempt %d): %s",
                candidate.run_id,
                step_name(step),
                claim.attempt,
                message,
            )
            store.record_error(claim, message)
            continue
        record = {
            "status": "finished",
            "suite": suite,
            "attempt": claim.attempt,
            "child_run_id": result.child_run_id,
            "metrics": result.metrics,
            "headline": result.headline,
            "seconds": result.seconds,
        }
        return "finished" if store.finish(candidate.run_id, step, record) else ""


def _write_report(session: Session, report: SweepReport, changed: bool) -> None:
    """Table and plot into the workspace, and (when the sweep changed something) into a
    ``sweep`` run of the experiment; an unchanged sweep reuses the existing report."""
    scope = report.experiment or "runs"
    folder = join(session.workspace, "eval", "reports", scope, report.suite)
    plot = join(folder, "sweep.png")
    if not report.rows:
        return
    if not changed and session.storage.exists(plot):
        report.plot_path = plot
        return
    png, _ = plot_sweep(report.rows, headline_metrics(report.rows))
    files = {
        "sweep.md": markdown_table(report.rows).encode(),
        "sweep.csv": csv_table(report.rows).encode(),
        "sweep.png": png,
    }
    for name, data in files.items():
        session.storage.write_bytes(join(folder, name), data)
    report.plot_path = plot
    if not changed:
        return
    experiment_id = session.experiment_id
    if report.experiment:
        found = session.client.get_experiment_by_name(report.experiment)
        experiment_id = found.experiment_id if found else experiment_id
    run = session.client.create_run(
        experiment_id,
        run_name=f"sweep-{report.suite}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"omni.stage": "sweep", "eval.suite": report.suite},
    )
    tracker = Tracker(session.client, run.info.run_id)
    tracker.log_metrics(
        {
            "sweep/evaluated": report.evaluated,
            "sweep/failed": report.failed,
            "sweep/skipped": report.skipped,
        },
        step=0,
    )
    for name, data in files.items():
        tracker.log_bytes(data, name)
    session.client.set_terminated(run.info.run_id, "FINISHED")
    report.report_run_id = run.info.run_id


# ---------------------------------------------------------------------------- generate


@dataclass
class GenerateResult:
    run_id: str
    step: int
    kind: str
    target: str
    out: str
    seconds: float


def generate_file(
    config: PipelineConfig,
    run_id: str,
    value: str,
    target: str,
    out: str | Path,
    step: int | None = None,
    suite: str | None = None,
) -> GenerateResult:
    """``omni generate``: one response of ``target`` for a text or media file, written to
    ``out`` (UTF-8 text, PNG, or WAV), with the suite's sampler settings."""
    started = time.time()
    _, settings = suite_config(config, suite)
    session = Session(config)
    kind, local = encode_input(session.tokenizers, value)
    check_task(kind, target)
    loaded = session.load(run_id, step, settings)
    sampler = settings.sampler if settings.dgs else without_dgs(settings.sampler)
    ids = instruction(loaded.model.layout, kind, local)
    tokens = media_tokens_for(session.tokenizers, target, seconds=4.0)
    out_ids = generate_batch(loaded, [ids], target, sampler, tokens, settings.seed).responses[0]
    data = decoded_file(session.tokenizers, target, out_ids)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return GenerateResult(
        run_id, loaded.step, kind, target, str(path), round(time.time() - started, 2)
    )


# ---------------------------------------------------------------------------- compare


@dataclass
class CompareReport:
    """The ablation table: one row per variant (mean and spread over its seeds)."""

    rows: list[dict[str, Any]]
    table_markdown: str
    run_id: str | None
    notes: list[str] = field(default_factory=list)


def _variant(params: dict[str, str], differing: list[str]) -> str:
    return ", ".join(f"{k}={params.get(k, '-')}" for k in differing) or "all runs"


def compare(config: PipelineConfig, run_ids: list[str],
            suites: list[str] | None = None) -> CompareReport:  # fmt: skip
    """``omni eval compare``: the latest finished evaluation of each run, grouped into
    variants by the ``model.*`` / ``train.*`` params that differ between the runs (the
    seed aside) and by suite; each column's mean +- standard deviation over the group."""
    from mlflow.exceptions import MlflowException

    session = Session(config)
    client, notes = session.client, []
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise EvalInputError(f"unknown run id {run_id!r} in {client.tracking_uri}") from None
    keys = sorted({k for r in runs for k in r.data.params if k.split(".")[0] in ("model", "train")})
    differing = [k for k in keys if k != "train.seed"
                 and len({r.data.params.get(k) for r in runs}) > 1]  # fmt: skip
    groups: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        run_id = run.info.run_id
        query = f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`eval.status` = 'FINISHED'"
        latest: dict[str, Any] = {}
        for child in client.search_runs([run.info.experiment_id], query, max_results=1000):
            suite = child.data.tags.get("eval.suite", "default")
            step = int(child.data.tags.get("eval.checkpoint_step", 0))
            if suites and suite not in suites:
                continue
            if suite not in latest or step > latest[suite][0]:
                latest[suite] = (step, child.data.metrics)
        if not latest:
            notes.append(f"run {run_id}: no finished evaluation (run omni sweep first), left out")
            continue
        for suite, (_, metrics) in sorted(latest.items()):
            label = _variant(run.data.params, differing)
            label = (
                f"{label} [{suite}]" if (suites and len(suites) > 1) or len(latest) > 1 else label
            )
            groups.setdefault(label, []).append(category_scores(metrics))
    rows = []
    for label, scores in sorted(groups.items()):
        row: dict[str, Any] = {"variant": label, "runs": len(scores)}
        for column in SCORES:
            values = [s[column] for s in scores if column in s]
            if values:
                mean = sum(values) / len(values)
                spread = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
                row[column] = (mean, spread)
        rows.append(row)
    table = _compare_markdown(rows)
    report_run = client.create_run(
        session.experiment_id if not runs else runs[0].info.experiment_id,
        run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"omni.stage": "compare", "compare.runs": ",".join(run_ids)[:5000]},
    )
    tracker = Tracker(client, report_run.info.run_id)
    tracker.log_bytes(table.encode(), "compare.md")
    tracker.log_bytes(json.dumps(rows, indent=2).encode(), "compare.json")
    client.set_terminated(report_run.info.run_id, "FINISHED")
    return CompareReport(rows, table, report_run.info.run_id, notes)


def _compare_markdown(rows: list[dict[str, Any]]) -> str:
    """| variant | seeds | understanding | generation | retrieval | average | (mean +- sd)."""
    header = ["variant", "seeds", *(c.split("/")[1] for c in SCORES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" if c in row else "-" for c in SCORES]
        lines.append("| " + " | ".join([row["variant"], str(row["runs"]), *cells]) + " |")
    return "\n".join(lines) + "\n"
