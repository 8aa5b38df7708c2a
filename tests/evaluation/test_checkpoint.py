"""A checkpoint made with another vocabulary layout than the tokenizers' is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evaluation.checkpoint import EvalInputError, RunInfo, load_checkpoint, resolve_step
from infra.services import MotoServer
from infra.storage import Storage, StorageConfig
from tests.conftest import upload_folder
from tokenization.vocab import VocabLayout
from training.checkpointing import COMPLETE, MODEL_DIR
from training.model import OmniModel
from training.model_config import load_model_config
from training.train_config import ModelSection

LAYOUT = VocabLayout(text_size=40, image_size=16, audio_size=8)


def checkpoint(workspace: Path, run_id: str, step: int) -> None:
    folder = workspace / "checkpoints" / run_id / f"step-{step:07d}"
    codebooks = {"image": torch.randn(16, 4), "audio": torch.randn(8, 4)}
    OmniModel(load_model_config("tiny"), LAYOUT, codebooks).save(folder / MODEL_DIR)
    (folder / COMPLETE).write_text("{}")


def test_other_layout_and_missing_steps_are_one_clear_error(tmp_path: Path) -> None:
    checkpoint(tmp_path, "run", 2)
    storage = Storage()
    assert resolve_step(storage, str(tmp_path), "run", None) == 2
    with pytest.raises(EvalInputError, match=r"no complete checkpoint at step 4; it has \[2\]"):
        resolve_step(storage, str(tmp_path), "run", 4)
    with pytest.raises(EvalInputError, match="has no complete checkpoint"):
        resolve_step(storage, str(tmp_path), "other", None)
    info = RunInfo("run", "0", "train-tiny", 0, ModelSection(), {})
    other = SimpleNamespace(layout=VocabLayout(text_size=41, image_size=16, audio_size=8))
    with pytest.raises(EvalInputError, match="vocabulary layout"):
        load_checkpoint(storage, str(tmp_path), info, 2, other, torch.device("cpu"))
    same = SimpleNamespace(layout=LAYOUT)
    loaded = load_checkpoint(storage, str(tmp_path), info, 2, same, torch.device("cpu"))
    assert loaded.step == 2 and loaded.path is not None and loaded.objective == "dfm"


def test_an_s3_checkpoint_is_loaded_from_its_model_folder_alone(
    tmp_path: Path, moto_server: MotoServer, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation and ``omni generate`` (both through ``load_checkpoint``) download
    ``model/``, never the optimizer partitions beside it (~6x the weights' size)."""
    import s3fs

    checkpoint(tmp_path, "run", 2)
    step = tmp_path / "checkpoints" / "run" / "step-0000002"
    for rank in (0, 1):
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"0" * 4096)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"0" * 4096)
    upload_folder(moto_server, "eval-load", "ws/checkpoints", tmp_path / "checkpoints")
    fetched: list[str] = []
    real_get_file = s3fs.S3FileSystem._get_file

    async def spy(self: s3fs.S3FileSystem, rpath: str, lpath: str, **kwargs: object) -> object:
        fetched.append(rpath)
        return await real_get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", spy)
    storage = Storage(StorageConfig.model_validate({"s3": {"endpoint_url": s3_env}}))
    info = RunInfo("run", "0", "train-tiny", 0, ModelSection(), {})
    same = SimpleNamespace(layout=LAYOUT)
    loaded = load_checkpoint(storage, "s3://eval-load/ws", info, 2, same, torch.device("cpu"))
    assert loaded.step == 2
    assert sorted(p.rsplit("/", 2)[-2] for p in fetched) == ["model"] * 3
