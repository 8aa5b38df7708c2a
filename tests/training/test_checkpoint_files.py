"""Which checkpoint files each reader fetches from s3:// (moto): a resuming rank its own
partitions and the shared files, evaluation and generation ``model/`` alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.services import MotoServer
from infra.storage import Storage, StorageConfig
from tests.conftest import upload_folder
from training.checkpointing import fetch_local, fetch_model, needed_to_resume, rank_of

SHARED = ["trainer.json", "_COMPLETE.json", "mp_rank_00_model_states.pt"]
# Ranks 1 and 10: a rank's name must not match a longer one's.
PER_RANK = {
    1: ["rank-1.json", "_UPLOADED-rank-1", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    10: ["rank-10.json", "_UPLOADED-rank-10", "zero_pp_rank_10_mp_rank_00_optim_states.pt"],
    0: ["rank-0.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
}  # fmt: skip
MODEL = ["model/model.safetensors", "model/config.json", "model/vocab_layout.json"]


def test_every_file_has_its_rank_or_is_shared() -> None:
    for rank, names in PER_RANK.items():
        assert {rank_of(name) for name in names} == {rank}
    assert {rank_of(name) for name in SHARED + MODEL} == {None}
    assert rank_of("step-0000004/zero_pp_rank_10_mp_rank_00_optim_states.pt") == 10


@pytest.fixture
def s3_checkpoint(tmp_path: Path, moto_server: MotoServer, s3_env: str) -> tuple[Storage, str]:
    """A step folder on moto with every kind of file: shared, per rank, ``model/``."""
    folder = tmp_path / "step-0000004"
    for name in SHARED + MODEL + [n for names in PER_RANK.values() for n in names]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    upload_folder(moto_server, "ckpt-files", "run/step-0000004", folder)
    storage = Storage(StorageConfig.model_validate({"s3": {"endpoint_url": s3_env}}))
    return storage, "s3://ckpt-files/run/step-0000004"


def local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_resuming_rank_fetches_its_own_files_and_the_shared_ones(
    s3_checkpoint: tuple[Storage, str], tmp_path: Path
) -> None:
    storage, uri = s3_checkpoint
    wanted = {1: {"rank-1.json", *PER_RANK[1][2:]}, 10: {"rank-10.json", PER_RANK[10][2]}}
    for rank, own in wanted.items():
        scratch = tmp_path / f"rank-{rank}"
        local = fetch_local(storage, uri, scratch, lambda r, rank=rank: needed_to_resume(r, rank))
        assert local_files(local) == own | set(SHARED)
        assert (local / f"rank-{rank}.json").read_bytes() == f"rank-{rank}.json".encode()


def test_evaluation_fetches_the_model_folder_alone(
    s3_checkpoint: tuple[Storage, str], tmp_path: Path
) -> None:
    storage, uri = s3_checkpoint
    scratch = tmp_path / "scratch"
    model = fetch_model(storage, uri, scratch)
    assert model.name == "model" and local_files(model) == {m.split("/")[1] for m in MODEL}
    assert local_files(scratch) == {f"step-0000004/{m}" for m in MODEL}
    local = tmp_path / "local-step"
    local.mkdir()
    assert fetch_model(storage, str(local), tmp_path / "unused") == local / "model"
