"""The training stage (``omni train``): inputs, the run's lifecycle, Ray Train launch."""

from pipelines.train.inputs import TrainInputError
from pipelines.train.stage import TrainReport, run

__all__ = ["TrainInputError", "TrainReport", "run"]
