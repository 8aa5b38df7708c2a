"""The evaluation stage's public face: ``omni eval`` / ``omni sweep`` / ``omni generate`` /
``omni eval compare`` (:mod:`pipelines.eval.cli`) and the workflow's eval stage
(:mod:`pipelines.workflow.dag`) call these; the work is in :mod:`pipelines.eval`.

Every evaluation is a child MLflow run of the training run, its headline metrics mirrored
into the training run as ``eval/<metric>`` at the checkpoint's step. ``omni eval`` and
every sweep go through one claim store (``evaluation.claims``: exclusive, leased claims
and a done record per checkpoint and suite), so each checkpoint is evaluated exactly once
whichever command reaches it, retried on failure, and never twice even when a slow
evaluation outlives its lease. Tasks live in ``evaluation.tasks`` and know nothing of
MLflow or claims.
"""

from pipelines.eval.child_run import EvalResult
from pipelines.eval.compare import CompareReport, compare
from pipelines.eval.generate import GenerateResult, generate_file
from pipelines.eval.publication import mirrored_name
from pipelines.eval.session import Session, suite_config
from pipelines.eval.single import evaluate
from pipelines.eval.sweep import SweepReport, sweep

__all__ = [
    "CompareReport",
    "EvalResult",
    "GenerateResult",
    "Session",
    "SweepReport",
    "compare",
    "evaluate",
    "generate_file",
    "mirrored_name",
    "suite_config",
    "sweep",
]
