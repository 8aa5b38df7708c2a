"""Saving and loading tokenizer components: ``config.json`` + ``model.safetensors``.

Weights go through safetensors only, so loading a directory never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

C = TypeVar("C", bound=BaseModel)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_component(directory: str | Path, config: BaseModel, module: torch.nn.Module) -> None:
    """Write ``config.json`` and ``model.safetensors`` for ``module`` into ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    # Cloning breaks storage sharing between tied tensors, which save_file refuses.
    tensors = {
        name: t.detach().cpu().clone().contiguous() for name, t in module.state_dict().items()
    }
    save_file(tensors, str(folder / WEIGHTS_FILE))


def load_component(directory: str | Path, config_cls: type[C]) -> tuple[C, dict[str, torch.Tensor]]:
    """Read back what :func:`save_component` wrote; a missing file is named in the error."""
    folder = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not a saved tokenizer component")
    config = config_cls.model_validate_json((folder / CONFIG_FILE).read_text())
    return config, load_file(str(folder / WEIGHTS_FILE))
