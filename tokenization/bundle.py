"""All tokenizers of a run, saved and loaded together with their vocabulary layout.

Directory layout (``<workspace>/tokenizers/``)::

    text/   tokenizer.json, text_config.json
    image/  config.json, model.safetensors
    audio/  config.json, model.safetensors
    video.json                  frames per video (videos reuse the image tokenizer)
    vocab_layout.json           the unified vocabulary built from the three
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.storage import Storage, is_remote, join
from tokenization.audio import AudioTokenizer
from tokenization.image import ImageTokenizer
from tokenization.text import TextTokenizer
from tokenization.video import VideoConfig, VideoTokenizer
from tokenization.vocab import VocabLayout

VIDEO_FILE = "video.json"
SAVED_FILES = (
    "text/tokenizer.json", "text/text_config.json", "image/config.json",
    "image/model.safetensors", "audio/config.json", "audio/model.safetensors",
    VIDEO_FILE, "vocab_layout.json",
)  # fmt: skip


@dataclass
class Tokenizers:
    """The text, image, audio and video tokenizers and the layout that unifies their ids."""

    text: TextTokenizer
    image: ImageTokenizer
    audio: AudioTokenizer
    video: VideoTokenizer

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(
            text_size=self.text.vocab_size,
            image_size=self.image.quantizer.vocab_size,
            audio_size=self.audio.quantizer.vocab_size,
        )

    def to(self, device: str | torch.device) -> Tokenizers:
        self.image.to(device)
        self.audio.to(device)
        return self

    def save(self, directory: str | Path) -> None:
        folder = Path(directory)
        self.text.save_pretrained(folder / "text")
        self.image.save_pretrained(folder / "image")
        self.audio.save_pretrained(folder / "audio")
        (folder / VIDEO_FILE).write_text(self.video.config.model_dump_json(indent=2))
        self.layout.save(folder)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Tokenizers:
        """Load a saved set; the stored layout must match the one the tokenizers imply."""
        folder = Path(directory)
        image = ImageTokenizer.from_pretrained(folder / "image").to(device).eval()
        video_config = VideoConfig.model_validate_json((folder / VIDEO_FILE).read_text())
        tokenizers = cls(
            text=TextTokenizer.from_pretrained(folder / "text"),
            image=image,
            audio=AudioTokenizer.from_pretrained(folder / "audio").to(device).eval(),
            video=VideoTokenizer(image, video_config),
        )
        tokenizers.layout.check_same(VocabLayout.load(folder), f"tokenizers in {folder}")
        return tokenizers

    @classmethod
    def load_uri(cls, storage: Storage, uri: str, device: str | torch.device = "cpu") -> Tokenizers:
        """Load from a local folder or, through ``storage``, from ``s3://`` (via a temp copy)."""
        if not is_remote(uri):
            return cls.load(uri, device)
        with tempfile.TemporaryDirectory(prefix="tokenizers-") as folder:
            scratch = Path(folder)
            for name in SAVED_FILES:
                (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                (scratch / name).write_bytes(storage.read_bytes(join(uri, name)))
            return cls.load(scratch, device)
