"""The errors evaluation raises for the command line (no heavy imports here, so the
command line can catch them without loading torch or DeepSpeed)."""


class EvalInputError(ValueError):
    """Input a user must fix: unknown run, no checkpoint, other vocabulary, wrong file."""


class EvaluationFailed(RuntimeError):
    """A checkpoint's evaluation is recorded failed (every attempt raised); its errors."""
