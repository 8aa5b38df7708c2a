"""One small storage API over plain paths, ``file://`` and ``s3://`` URIs.

Every stage reads and writes under the workspace through :class:`Storage`, never through a
raw ``open``, so the same code runs on a laptop and against a bucket. fsspec (and s3fs for
``s3://``) does the I/O; this module adds what fsspec leaves to the caller:

* atomic writes: a reader never sees half a file (temp name + rename locally; on S3 an
  object only becomes visible when its single PUT, or its multipart upload, completes);
* bounded retries with exponential backoff and jitter on transient errors (network
  errors and timeouts, S3's 5xx and throttling answers), then one :class:`StorageError`
  that names the endpoint instead of a botocore traceback;
* URIs in, URIs out: ``glob`` and ``list`` return strings in the caller's own style.

Credentials are never part of the config: s3fs takes them from the standard AWS
environment variables (``AWS_ACCESS_KEY_ID`` ...) or profiles, so they cannot leak into
logs; when there are none, one :class:`StorageError` says which URI needed them and
where they are read from.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class S3Config(BaseModel):
    """Where the S3 API lives; credentials come from the AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:5000 for moto/minio")
    region: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)


class StorageConfig(BaseModel):
    """Storage section of a pipeline config."""

    model_config = ConfigDict(extra="forbid")

    s3: S3Config = Field(default_factory=S3Config)
    retries: int = Field(3, ge=1, description="attempts per operation on transient errors")
    backoff_s: float = Field(
        0.5, ge=0, description="first retry delay; doubles each attempt, with random jitter"
    )


class StorageError(RuntimeError):
    """A storage operation failed for a reason the user must fix (endpoint, permissions)."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        errors += [
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
        ]
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()
# S3 error codes that mean "try again": throttling, an overloaded or failing front end.
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
     "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}
)  # fmt: skip


class TransientError(OSError):
    """Raised by an operation to ask :meth:`Storage.retry` for another try."""


def s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of the botocore ``ClientError`` behind ``exc`` (s3fs keeps
    it as the ``__cause__`` of the OSError it raises), or (None, None)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return response["Error"].get("Code"), status
        error = error.__cause__ or error.__context__
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another try: a network error or timeout, or an S3 answer of
    5xx, 429 or a throttling code."""
    if isinstance(exc, (TransientError, *TRANSIENT_ERRORS)):
        return True
    code, status = s3_error(exc)
    return code in TRANSIENT_S3_CODES or status == 429 or (status or 0) >= 500


def _credential_errors() -> tuple[type[BaseException], ...]:
    with contextlib.suppress(ImportError):
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        return (NoCredentialsError, PartialCredentialsError)
    return ()


CREDENTIAL_ERRORS = _credential_errors()
CREDENTIAL_SOURCES = (
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or a profile "
    "(AWS_PROFILE, default 'default') in ~/.aws/credentials or ~/.aws/config "
    "(AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE)"
)


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local scheme (``s3://``)."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI or a local path, keeping its style."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    """The directory containing ``uri``, in the same style."""
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)


class Storage:
    """Filesystem access for every URI style the pipeline accepts.

    Picklable (it holds only its config), so it can be shipped to Ray workers; each
    process builds its fsspec filesystems lazily and fsspec caches them.
    """

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()

    # -- filesystem resolution -------------------------------------------------------------
    def _options(self, uri: str) -> dict[str, Any]:
        if not uri.startswith("s3://"):
            return {}
        s3 = self.config.s3
        client_kwargs: dict[str, Any] = {}
        if s3.endpoint_url:
            client_kwargs["endpoint_url"] = s3.endpoint_url
        if s3.region:
            client_kwargs["region_name"] = s3.region
        return {
            "client_kwargs": client_kwargs,
            # Retries happen here, in retry(), where they are bounded and reported.
            "config_kwargs": {
                "connect_timeout": s3.connect_timeout_s,
                "read_timeout": s3.read_timeout_s,
                "retries": {"total_max_attempts": 1},  # botocore: no retry of its own
            },
        }

    def stream_options(self, uri: str, attempts: int = 5) -> dict[str, Any]:
        """fsspec options for a long-lived reader of ``uri`` that does not go through this
        class (a training data stream): botocore retries transient S3 errors itself,
        ``attempts`` times, since no ``retry`` wraps such a reader."""
        options = self._options(uri)
        if options:
            retries = {"max_attempts": attempts, "mode": "standard"}
            options["config_kwargs"] = {**options["config_kwargs"], "retries": retries}
        return options

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path inside it."""
        return url_to_fs(uri, **self._options(uri))

    def describe(self, uri: str) -> str:
        """Where ``uri`` lives, for error messages (never includes credentials)."""
        if uri.startswith("s3://"):
            return f"S3 endpoint {self.config.s3.endpoint_url or 'AWS default'}"
        return "local filesystem"

    def retry(self, uri: str, operation: Callable[[], T]) -> T:
        """``operation()``, tried up to ``retries`` times while it fails transiently
        (:func:`is_transient`), sleeping ``backoff_s * 2**k`` with equal jitter (half of
        it fixed, half random) between tries, so that sweeps and workers that failed
        together do not retry together; then one :class:`StorageError`."""
        for attempt in range(1, self.config.retries + 1):
            try:
                return operation()
            except CREDENTIAL_ERRORS as exc:
                raise StorageError(
                    f"no AWS credentials for {uri} ({self.describe(uri)}): {exc}; they are read "
                    f"from {CREDENTIAL_SOURCES}"
                ) from exc
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.config.retries:
                    verb = "reach" if isinstance(exc, TRANSIENT_ERRORS) else "use"
                    raise StorageError(
                        f"cannot {verb} {self.describe(uri)} for {uri} after "
                        f"{attempt} attempts: {exc}"
                    ) from exc
                ceiling = self.config.backoff_s * 2 ** (attempt - 1)
                time.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))
        raise AssertionError("unreachable")

    def _on_path(self, uri: str, method: str, *args: Any, **kwargs: Any) -> Any:
        def call() -> Any:
            fs, path = self.filesystem(uri)
            return getattr(fs, method)(path, *args, **kwargs)

        return self.retry(uri, call)

    def _to_uri(self, template: str, path: str) -> str:
        """Turn a path fsspec returned back into the caller's URI style."""
        if "://" in template:
            scheme = template.split("://", 1)[0]
            if scheme in ("file", "local"):
                return f"{scheme}://{path}"
            return f"{scheme}://{path.lstrip('/')}"
        if os.path.isabs(template):
            return path
        return os.path.relpath(path)

    # -- queries ---------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return bool(self._on_path(uri, "exists"))

    def isdir(self, uri: str) -> bool:
        return bool(self._on_path(uri, "isdir"))

    def info(self, uri: str) -> dict[str, Any]:
        """Size, type and (where the backend has one) mtime or ETag of ``uri``."""
        return dict(self._on_path(uri, "info"))

    def size(self, uri: str) -> int:
        return int(self.info(uri)["size"])

    def glob(self, pattern: str) -> list[str]:
        """Sorted URIs matching a glob pattern (``*``, ``**``, ``?``, ``[..]``)."""
        paths = self._on_path(pattern, "glob")
        return sorted(self._to_uri(pattern, p) for p in paths)

    def list(self, uri: str) -> list[str]:
        """Sorted URIs of the entries directly under ``uri`` (empty if it does not exist)."""
        if not self.exists(uri):
            return []
        paths = self._on_path(uri, "ls", detail=False)
        return sorted(self._to_uri(uri, p) for p in paths)

    # -- reading ---------------------------------------------------------------------------
    def open(self, uri: str, mode: str = "rb") -> IO[Any]:
        """Open for reading. Writers use :meth:`write_bytes` or :meth:`atomic_writer`."""
        if any(c in mode for c in "wax+"):
            raise ValueError("Storage.open is read-only; use write_bytes or atomic_writer")
        return self._on_path(uri, "open", mode)

    def read_bytes(self, uri: str) -> bytes:
        return self._on_path(uri, "cat_file")

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``uri`` (one ranged GET on S3)."""
        return self._on_path(uri, "cat_file", start=start, end=end)

    # -- writing ---------------------------------------------------------------------------
    def makedirs(self, uri: str) -> None:
        if not is_remote(uri):  # S3 has no directories to create
            os.makedirs(self.filesystem(uri)[1], exist_ok=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` so that readers see either the old object or the whole new one."""
        fs, path = self.filesystem(uri)
        if is_remote(uri):
            self.retry(uri, lambda: fs.pipe_file(path, data))
            return
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    @contextlib.contextmanager
    def atomic_writer(self, uri: str) -> Iterator[io.BytesIO]:
        """Yield a buffer; its content is published atomically at ``uri`` on clean exit."""
        buffer = io.BytesIO()
        yield buffer
        self.write_bytes(uri, buffer.getvalue())

    def remove(self, uri: str, recursive: bool = False) -> None:
        """Delete ``uri`` (a directory tree with ``recursive``); missing is not an error."""
        if self.exists(uri):
            self._on_path(uri, "rm", recursive=recursive)
