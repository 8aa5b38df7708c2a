"""Units of work on a real Ray instance: results, bounded retries, loud failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from infra.storage import StorageError
from pipelines.ray_units import UnitFailed, find_crashing, run_units

pytestmark = pytest.mark.integration


def double(row: dict, offset: int) -> dict:
    return {"value": row["value"] * 2 + offset}


def flaky(row: dict, folder: str) -> dict:
    """Fails with a transient storage error on the first attempt of each unit."""
    marker = Path(folder) / f"{row['name']}.tried"
    if not marker.exists():
        marker.write_text("1")
        raise StorageError("S3 endpoint reset the connection")
    return {"name": row["name"]}


def broken(row: dict) -> dict:
    raise ValueError(f"cannot decode {row['name']}")


def test_every_row_gives_one_result(ray_cluster: None) -> None:
    results = run_units(double, [{"value": v} for v in range(7)], {"offset": 1},
                        cpus_per_unit=1, description="test", retries=0)  # fmt: skip
    assert sorted(r["value"] for r in results) == [1, 3, 5, 7, 9, 11, 13]


def test_transient_errors_are_retried(ray_cluster: None, tmp_path: Path) -> None:
    rows = [{"name": f"part-{i}"} for i in range(3)]
    results = run_units(flaky, rows, {"folder": str(tmp_path)},
                        cpus_per_unit=1, description="test", retries=2)  # fmt: skip
    assert sorted(r["name"] for r in results) == ["part-0", "part-1", "part-2"]


def test_a_failing_unit_fails_the_run_and_names_the_unit(ray_cluster: None) -> None:
    with pytest.raises(UnitFailed, match=r"test unit part-7 failed .*ValueError: cannot decode"):
        run_units(broken, [{"name": "part-7"}], {}, cpus_per_unit=1, description="test",
                  retries=1)  # fmt: skip


def die_on_poison(items: list[int], poison: list[int]) -> None:
    """Processes ``items``; the worker process dies outright if one of them is poison."""
    if set(items) & set(poison):
        os._exit(1)


def test_find_crashing_bisects_down_to_every_culprit(ray_cluster: None) -> None:
    probe = ray.remote(die_on_poison).options(max_retries=0)
    items = list(range(10))
    assert find_crashing(lambda group: probe.remote(group, [2, 7]), items) == [2, 7]
    assert find_crashing(lambda group: probe.remote(group, []), items) == []
