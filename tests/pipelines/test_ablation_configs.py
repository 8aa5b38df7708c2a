"""The paradigm ablation's configs differ only in what they ablate: the same workspace
(tokens), model size, steps, batches, seeds and evaluation suites."""

from __future__ import annotations

from typing import Any

from infra.config import public_dict
from pipelines.config import load_pipeline_config
from tests.conftest import REPO

ABLATED = {("model", "objective"), ("train", "loss_weighting"), ("train", "loss_weights")}


def flat(config: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(section, key): value for section, values in config.items()
            if isinstance(values, dict) for key, value in values.items()}  # fmt: skip


def test_ablation_variants_differ_only_in_the_ablated_settings() -> None:
    variants = {
        path.stem: flat(public_dict(load_pipeline_config(path)))
        for path in sorted((REPO / "configs" / "ablation").glob("*.yaml"))
    }
    assert set(variants) == {"ar", "dfm", "dfm-no-rec"}
    recipe = variants.pop("dfm")
    for name, variant in variants.items():
        differing = {key for key in recipe.keys() | variant.keys()
                     if recipe.get(key) != variant.get(key)}  # fmt: skip
        assert differing and differing <= ABLATED, (name, differing)
    assert {"default", "no_dgs"} <= set(recipe[("eval", "suites")])  # DGS on / off
    assert recipe[("eval", "suites")]["no_dgs"]["dgs"] is False
