"""The ``shard`` section of the config (light: pydantic only, no Ray or media libraries)."""

from __future__ import annotations

from pydantic import Field

from infra.config import Section


class ShardConfig(Section):
    """The ``shard`` section. Token costs are estimates used only to balance shards."""

    target_tokens: int = Field(1_000_000, gt=0, description="estimated tokens per output shard")
    jsonl_split_bytes: int = Field(
        256 * 1024, gt=0, description="JSONL bytes per planning split (much less than a shard)"
    )
    parquet_split_rows: int = Field(
        256, gt=0, description="Parquet rows per planning split (much less than a shard)"
    )
    row_group_rows: int = Field(256, gt=0, description="rows per row group in output shards")
    max_image_pixels: int = Field(
        50_000_000, gt=0, description="images above this, read from the header, are rejected"
    )
    max_media_bytes: int = Field(512 * 2**20, gt=0, description="media files above are rejected")
    video_probe_frames: int = Field(2, gt=0, description="frames decoded to validate a video")
    text_bytes_per_token: float = Field(4.0, gt=0, description="UTF-8 bytes per BPE token")
    tokens_per_image: int = Field(256, gt=0, description="image tokenizer: tokens per image")
    audio_tokens_per_second: float = Field(12.5, gt=0, description="audio tokenizer token rate")
    audio_seconds_estimate: float = Field(
        10.0, gt=0, description="clip length assumed when planning, before audio is decoded"
    )
    video_frames: int = Field(8, gt=0, description="frames sampled per video by the tokenizer")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs reserved per task")
    task_retries: int = Field(
        3, ge=0, description="re-runs of a task whose worker died or hit a transient I/O error"
    )
