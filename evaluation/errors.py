"""The one error evaluation raises for input a user must fix (no heavy imports here, so
the command line can catch it without loading torch or DeepSpeed)."""


class EvalInputError(ValueError):
    """Input a user must fix: unknown run, no checkpoint, other vocabulary, wrong file."""
