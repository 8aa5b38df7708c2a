"""The two primitives of a lock on object storage: create-if-absent, and an object's age.

``create_exclusive`` writes an object only if nothing is at its name, and says whether
this call created it. On S3 that is a PUT with ``If-None-Match: *``, and AWS has two
ways of saying "someone else was first": ``412 PreconditionFailed`` (the object exists)
and ``409 ConditionalRequestConflict`` (a conflicting write to the key is in flight).
Either one sends us to read what is there: our own bytes mean an earlier try of ours
landed but its answer was lost (a timeout, then a retry), other bytes mean we lost, and
nothing there (409 only) means the race is still open, so we try again with backoff.
Transient errors (5xx, throttling, timeouts) are retried by :meth:`Storage.retry`.

``age_s`` measures how long ago an object was last written *with the store's clock*
(S3: the response's ``Date`` minus the object's ``LastModified``), so a lease held in
an object is judged the same way by every reader, whatever their own clocks say.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from email.utils import parsedate_to_datetime

from infra.storage import Storage, StorageError, TransientError, is_remote, s3_error

log = logging.getLogger(__name__)

LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
S3_CLOCK_RESOLUTION_S = 1.0  # LastModified and Date are whole seconds


class ConditionalConflict(TransientError):
    """409 ConditionalRequestConflict and nothing at the key yet: another write is in flight."""


def lost_race(exc: BaseException) -> bool:
    """Whether ``exc`` is S3's answer to a conditional write that found a rival: 412 (s3fs
    raises FileExistsError for it) or 409 ConditionalRequestConflict."""
    code, status = s3_error(exc)
    return isinstance(exc, FileExistsError) or code in LOST_RACE_CODES or status in (409, 412)


def create_exclusive(storage: Storage, uri: str, data: bytes) -> bool:
    """Write ``data`` at ``uri`` only if nothing is there; True if this call created it.

    Readers never see a partial object: locally the content is written to a temp file
    first and hard-linked into place (``link`` fails when the name exists); on S3 the PUT
    is conditional and a lost race is told apart from a lost answer by reading back.
    """
    if is_remote(uri):
        return _put_if_absent(storage, uri, data)
    path = storage.filesystem(uri)[1]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


def _put_if_absent(storage: Storage, uri: str, data: bytes) -> bool:
    fs, path = storage.filesystem(uri)
    bucket, key = path.split("/", 1)

    def attempt() -> bool:
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as error:
            if not lost_race(error):
                raise
        finally:  # s3fs caches listings; this write went around it
            fs.invalidate_cache(path)
        try:
            return bool(fs.cat_file(path) == data)
        except FileNotFoundError:
            raise ConditionalConflict(f"conditional write to {uri} conflicted") from None

    try:
        return storage.retry(uri, attempt)
    except StorageError as error:
        if not isinstance(error.__cause__, ConditionalConflict):
            raise
        log.warning("%s: every conditional write conflicted; counted as a lost race", uri)
        return False


def age_s(storage: Storage, uri: str) -> float:
    """Seconds since ``uri`` was last written, by the store's clock, rounded down to what
    the store can tell (S3 stamps whole seconds): the object is at least this old."""
    fs, path = storage.filesystem(uri)
    if not is_remote(uri):
        return time.time() - storage.retry(uri, lambda: os.stat(path).st_mtime)
    bucket, key = path.split("/", 1)
    head = storage.retry(uri, lambda: fs.call_s3("head_object", Bucket=bucket, Key=key))
    now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - head["LastModified"]).total_seconds() - S3_CLOCK_RESOLUTION_S
