"""Raw-corpus readers, one per input format, found by name in :data:`READERS`."""

from pipelines.shard.readers.base import InputWarning, Reader, Split, SplitOptions
from pipelines.shard.readers.jsonl import JsonlReader
from pipelines.shard.readers.obelics import ObelicsReader
from pipelines.shard.readers.webdataset_tar import WebDatasetReader

READERS: dict[str, Reader] = {
    "jsonl": JsonlReader(),
    "obelics": ObelicsReader(),
    "webdataset": WebDatasetReader(),
}

__all__ = ["READERS", "InputWarning", "Reader", "Split", "SplitOptions"]
