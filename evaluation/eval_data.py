"""The evaluation samples: the first N token samples of a bucket's split, read once.

``<workspace>/tokens/<bucket>/*.tar`` in file order (tars and the samples in them are
sorted by a stable key, so "the first N" is the same on every machine and every sweep).
A sample made with another vocabulary layout than the tokenizers' is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from infra.storage import Storage, join
from tokenization.token_samples import TokenSample, read_token_samples
from tokenization.vocab import VocabLayout

SPLITS = {"eval": ("eval",), "train": ("train",), "all": ("eval", "train")}


def load_samples(
    storage: Storage,
    workspace: str,
    buckets: Iterable[str],
    split: str,
    limit: int,
    layout: VocabLayout,
) -> dict[str, list[TokenSample]]:
    """``{bucket: up to `limit` samples of `split`}``; a bucket with no tars maps to []."""
    wanted = SPLITS[split]
    fingerprint = layout.fingerprint()
    out: dict[str, list[TokenSample]] = {}
    for bucket in sorted(set(buckets)):
        tars = storage.glob(join(workspace, "tokens", bucket, "*.tar"))
        options = storage.stream_options(tars[0]) if tars else None
        chosen: list[TokenSample] = []
        for sample in read_token_samples(tars, options) if tars else ():
            if sample.meta.get("split") not in wanted:
                continue
            made_with = sample.meta.get("layout")
            if made_with is not None and made_with != fingerprint:
                raise ValueError(
                    f"token sample {sample.key} was made with vocabulary layout {made_with}, "
                    f"the tokenizers have {fingerprint}: re-run omni pretokenize"
                )
            chosen.append(sample)
            if len(chosen) == limit:
                break
        out[bucket] = chosen
    return out
