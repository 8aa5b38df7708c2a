"""Errors raised by tokenizers for inputs they cannot accept."""


class TokenizerInputError(ValueError):
    """A medium a tokenizer cannot encode; the message says why.

    The pretokenize stage quarantines the sample with this message instead of failing.
    """
