"""Exception types, the one table that maps storage failures onto them, and retries.

Every failure a user can cause or meet is one of the :class:`FruitdaskError`
types below, with a one-line message that names the thing at fault; the CLI
prints that line and exits with the type's ``exit_code``. Storage errors are
translated once, where they happen (:func:`translate`, the shape of
``s3fs.errors.translate_boto_error``), by *type and code*: botocore's error
code or HTTP status, the ``errno`` of an ``OSError``, the AWS error code that
pyarrow's S3 client puts in its messages. What is retryable is a type,
:class:`TransientError`, and :func:`retrying` is the one retry loop every
engine uses.
"""

from __future__ import annotations

import errno
import functools
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "RETRY_WAITS",
    "AccessDeniedError",
    "Cancelled",
    "ClusterError",
    "FruitdaskError",
    "InputError",
    "JobError",
    "LockedError",
    "ModelError",
    "NotFoundError",
    "OutputExistsError",
    "StorageError",
    "TransientError",
    "from_record",
    "one_line",
    "retrying",
    "s3_error_code",
    "to_record",
    "translate",
]


class FruitdaskError(Exception):
    """A failure with a one-line message naming the thing at fault."""

    #: The CLI's exit status for this kind of failure.
    exit_code = 2


class InputError(FruitdaskError):
    """A bad argument, setting or input: nothing was started or written."""


class OutputExistsError(InputError):
    """The output holds something that this run may not replace."""


class ModelError(InputError):
    """Bad training data, options or model file."""


class LockedError(FruitdaskError):
    """Another run holds the output's lock."""


class ClusterError(FruitdaskError):
    """The cluster could not be started or reached."""


class StorageError(FruitdaskError):
    """A storage operation failed (not found, denied, unwritable ...)."""


class NotFoundError(StorageError):
    """The file, folder, bucket or key does not exist."""


class AccessDeniedError(StorageError):
    """The credentials do not allow the operation."""


class TransientError(StorageError):
    """The store as a whole failed (unreachable, timing out, throttling, 5xx),
    not one object: retry the work, never record its images as bad files."""


class JobError(FruitdaskError):
    """An engine's job failed for a reason that is not the input's (a bug, a crash)."""

    exit_code = 1


class Cancelled(FruitdaskError):
    """The run was asked to stop (SIGINT, SIGTERM) before it committed."""

    def __init__(self, signum: int | None = None, message: str = "") -> None:
        import signal as _signal

        self.signum = signum
        name = _signal.Signals(signum).name if signum else "a stop request"
        super().__init__(message or f"stopped by {name}")
        self.exit_code = 128 + signum if signum else 1


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message; prefixed with its type unless
    it is a :class:`FruitdaskError`, whose message is written for the user."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if isinstance(exc, FruitdaskError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def to_record(exc: FruitdaskError) -> dict[str, str]:
    """An error as plain data, to cross a process boundary that keeps no
    Python types (a Spark executor's failure reaches the driver as JVM text)."""
    return {"type": type(exc).__name__, "message": str(exc)}


def from_record(record: dict[str, Any]) -> FruitdaskError:
    """The typed error of :func:`to_record` (a :class:`JobError` for an unknown type)."""
    kinds = {cls.__name__: cls for cls in _subclasses(FruitdaskError)}
    kind = kinds.get(str(record.get("type")), JobError)
    message = str(record.get("message") or "failed")
    return Cancelled(message=message) if kind is Cancelled else kind(message)


def _subclasses(cls: type) -> list[type]:
    out: list[type] = [cls]
    sub: type
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


# ---------------------------------------------------------------- the table
#: S3 error codes (botocore's ``Error.Code``; pyarrow's AWS SDK names in capitals
#: without underscores map onto the same entries) -> what they mean here.
_S3_CODES: dict[str, type[StorageError]] = {
    "NoSuchBucket": NotFoundError,
    "NoSuchKey": NotFoundError,
    "NotFound": NotFoundError,
    "404": NotFoundError,
    "AccessDenied": AccessDeniedError,
    "AllAccessDisabled": AccessDeniedError,
    "InvalidAccessKeyId": AccessDeniedError,
    "SignatureDoesNotMatch": AccessDeniedError,
    "ExpiredToken": AccessDeniedError,
    "InvalidToken": AccessDeniedError,
    "RequestTimeTooSkewed": AccessDeniedError,
    "403": AccessDeniedError,
    "SlowDown": TransientError,
    "ServiceUnavailable": TransientError,
    "InternalError": TransientError,
    "RequestTimeout": TransientError,
    "Throttling": TransientError,
    "ThrottlingException": TransientError,
    "RequestLimitExceeded": TransientError,
}
# pyarrow's S3 client (the AWS C++ SDK) raises OSError whose message carries the
# SDK's error type, e.g. "AWS Error ACCESS_DENIED during GetObject operation".
_ARROW_CODES: dict[str, type[StorageError]] = {
    "NO_SUCH_KEY": NotFoundError,
    "NO_SUCH_BUCKET": NotFoundError,
    "RESOURCE_NOT_FOUND": NotFoundError,
    "ACCESS_DENIED": AccessDeniedError,
    "INVALID_ACCESS_KEY_ID": AccessDeniedError,
    "SIGNATURE_DOES_NOT_MATCH": AccessDeniedError,
    "INVALID_CLIENT_TOKEN_ID": AccessDeniedError,
    "EXPIRED_TOKEN": AccessDeniedError,
    "NETWORK_CONNECTION": TransientError,
    "SLOW_DOWN": TransientError,
    "SERVICE_UNAVAILABLE": TransientError,
    "INTERNAL_FAILURE": TransientError,
    "THROTTLING": TransientError,
    "REQUEST_TIMEOUT": TransientError,
    "REQUEST_EXPIRED": TransientError,
}
_ARROW_CODE = re.compile(r"AWS Error (?:\[code \d+\]: )?([A-Z_]+)")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")

_ERRNOS: dict[int, type[StorageError]] = {
    errno.ENOENT: NotFoundError,
    errno.ENOTDIR: NotFoundError,
    errno.EACCES: AccessDeniedError,
    errno.EPERM: AccessDeniedError,
    errno.ECONNREFUSED: TransientError,
    errno.ECONNRESET: TransientError,
    errno.ECONNABORTED: TransientError,
    errno.ETIMEDOUT: TransientError,
    errno.EHOSTUNREACH: TransientError,
    errno.ENETUNREACH: TransientError,
    errno.ENETDOWN: TransientError,
    errno.EPIPE: TransientError,
}

_WHAT = {
    NotFoundError: "not found",
    AccessDeniedError: "access denied (check credentials and permissions)",
    TransientError: "storage unavailable",
}


def s3_error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ClientError in the cause
    chain (s3fs keeps it as ``__cause__``), or ``(None, None)``."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return response["Error"].get("Code"), status
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None, None


def _botocore_transient(exc: BaseException) -> bool:
    """botocore's connection-level exceptions (no response at all)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            return False
        if isinstance(cur, (BotoConnectionError, HTTPClientError)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _kind(exc: BaseException) -> type[StorageError]:
    """Which :class:`StorageError` type a raw exception from a storage call is."""
    if isinstance(exc, StorageError):
        return type(exc)
    code, status = s3_error_code(exc)
    if code in _S3_CODES:
        return _S3_CODES[code]
    if status is not None and status >= 500:
        return TransientError
    if code is None and isinstance(exc, OSError) and not exc.errno:
        m = _ARROW_CODE.search(str(exc))
        if m and m.group(1) in _ARROW_CODES:
            return _ARROW_CODES[m.group(1)]
        s = _HTTP_STATUS.search(str(exc))
        if s and int(s.group(1)) >= 500:
            return TransientError
    if isinstance(exc, FileNotFoundError):
        return NotFoundError
    if isinstance(exc, PermissionError):
        return AccessDeniedError
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return _ERRNOS[exc.errno]
    if isinstance(exc, (ConnectionError, TimeoutError)) or _botocore_transient(exc):
        return TransientError
    return StorageError


def translate(exc: BaseException, url: str, action: str = "read") -> FruitdaskError:
    """One typed, one-line error naming ``url`` for an exception from a storage call.

    A :class:`FruitdaskError` passes unchanged.
    """
    if isinstance(exc, FruitdaskError):
        return exc
    kind = _kind(exc)
    if kind is StorageError:
        return StorageError(f"cannot {action} {url}: {one_line(exc)}")
    detail = "" if kind is NotFoundError else f" ({one_line(exc)})"
    if kind is TransientError:
        return TransientError(f"{url}: cannot reach the storage endpoint{detail}")
    return kind(f"{url}: {_WHAT[kind]}{detail if kind is not AccessDeniedError else ''}")


# ---------------------------------------------------------------- retries
#: Waits (seconds) between attempts when the store fails as a whole: a few
#: seconds of outage are ridden out (31 s in all); longer ones fail with one line.
#: The one schedule every engine uses.
RETRY_WAITS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)

F = TypeVar("F", bound=Callable[..., Any])


def retrying(fn: F, waits: tuple[float, ...] = RETRY_WAITS) -> F:
    """``fn`` run again, after each of ``waits``, while it raises :class:`TransientError`.

    ``fn`` must be idempotent. After the last wait the error is raised with the
    number of attempts in its message.
    """

    @functools.wraps(fn)  # keeps the name, so a wrapped task pickles by reference
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for wait in (*waits, None):
            try:
                return fn(*args, **kwargs)
            except TransientError as exc:
                if wait is None:
                    raise TransientError(
                        f"{exc} (still failing after {len(waits) + 1} attempts)"
                    ) from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]
