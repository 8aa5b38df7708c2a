"""Raw-corpus readers, one per input format, found by name in :data:`READERS`."""

from pipelines.readers.base import InputWarning, Reader, Split, SplitOptions
from pipelines.readers.jsonl import JsonlReader
from pipelines.readers.obelics import ObelicsReader
from pipelines.readers.webdataset_tar import WebDatasetReader

READERS: dict[str, Reader] = {
    "jsonl": JsonlReader(),
    "obelics": ObelicsReader(),
    "webdataset": WebDatasetReader(),
}

__all__ = ["READERS", "InputWarning", "Reader", "Split", "SplitOptions"]
