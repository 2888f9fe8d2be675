"""Typed errors: the translation table, one-line messages, the one retry loop."""

from __future__ import annotations

import errno
import threading

import pytest

from fruitdask import errors
from fruitdask.errors import (
    AccessDeniedError,
    Cancelled,
    InputError,
    JobError,
    NotFoundError,
    StorageError,
    TransientError,
    from_record,
    one_line,
    retrying,
    to_record,
    translate,
)


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} says no"},
         "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("NoSuchKey", 404, NotFoundError),
        ("NoSuchBucket", 404, NotFoundError),
        ("AccessDenied", 403, AccessDeniedError),
        ("InvalidAccessKeyId", 403, AccessDeniedError),
        ("SignatureDoesNotMatch", 403, AccessDeniedError),
        ("SlowDown", 503, TransientError),
        ("ServiceUnavailable", 503, TransientError),
        ("InternalError", 500, TransientError),
        ("WhateverNew", 502, TransientError),  # any 5xx: the store failed
        ("InvalidRange", 416, StorageError),
    ],
)
def test_botocore_codes_map_to_types(code, status, kind):
    err = translate(_client_error(code, status), "s3://b/k.jpg")
    assert type(err) is kind
    assert "s3://b/k.jpg" in str(err) and "\n" not in str(err)


def test_s3fs_wrapping_keeps_the_code():
    """s3fs turns ClientError into OSError with the original as __cause__."""
    from s3fs.errors import translate_boto_error

    wrapped = translate_boto_error(_client_error("SlowDown", 503))
    assert isinstance(translate(wrapped, "s3://b/k"), TransientError)
    wrapped = translate_boto_error(_client_error("AccessDenied", 403))
    assert isinstance(translate(wrapped, "s3://b/k"), AccessDeniedError)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError(errno.ENOENT, "gone"), NotFoundError),
        (PermissionError(errno.EACCES, "no"), AccessDeniedError),
        (OSError(errno.ECONNREFUSED, "refused"), TransientError),
        (OSError(errno.ETIMEDOUT, "slow"), TransientError),
        (ConnectionResetError(errno.ECONNRESET, "reset"), TransientError),
        (TimeoutError("late"), TransientError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageError),
        (ValueError("odd"), StorageError),
    ],
)
def test_errno_and_builtin_types(exc, kind):
    assert type(translate(exc, "/data/x.jpg")) is kind


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("When reading information for key 'a': AWS Error ACCESS_DENIED during HeadObject "
         "operation: Access Denied", AccessDeniedError),
        ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Couldn't "
         "connect to server", TransientError),
        ("AWS Error [code 99]: NO_SUCH_KEY during GetObject operation", NotFoundError),
        ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: ", TransientError),
        ("AWS Error SLOW_DOWN during PutObject operation", TransientError),
    ],
)  # fmt: skip
def test_pyarrow_aws_codes(message, kind):
    """pyarrow's S3 client says what failed only by the SDK's error code in its message."""
    assert type(translate(OSError(message), "s3://b/k")) is kind


def test_a_file_name_cannot_pose_as_an_outage():
    """The old text matching looked for 'Connection refused' anywhere in a message,
    which also holds the key: a file named so was retried as an outage."""
    exc = FileNotFoundError(errno.ENOENT, "No such file", "/in/Connection refused.jpg")
    assert type(translate(exc, "/in/Connection refused.jpg")) is NotFoundError
    exc = OSError("cannot decode /in/SlowDown ServiceUnavailable.jpg")
    assert type(translate(exc, "/in/x")) is StorageError


def test_fruitdask_errors_pass_unchanged_and_read_as_one_line():
    err = InputError("--partition-size must be >= 1, got 0")
    assert translate(err, "x") is err
    assert one_line(err) == "--partition-size must be >= 1, got 0"
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(KeyError()) == "KeyError"


def test_exit_codes():
    assert InputError("x").exit_code == 2
    assert StorageError("x").exit_code == 2
    assert JobError("x").exit_code == 1
    assert Cancelled(2).exit_code == 130 and Cancelled(15).exit_code == 143
    assert "SIGTERM" in str(Cancelled(15))


def test_records_cross_a_process_boundary_typed():
    for err in (TransientError("store down"), AccessDeniedError("denied"), Cancelled(15)):
        back = from_record(to_record(err))
        assert type(back) is type(err) and str(back) == str(err)
    assert type(from_record({"type": "NotOurs", "message": "m"})) is JobError


def test_retrying_rides_out_transient_errors_only():
    calls = []

    def flaky(n_failures: int):
        calls.append(1)
        if len(calls) <= n_failures:
            raise TransientError("store down")
        return "ok"

    assert retrying(flaky, waits=(0.0, 0.0, 0.0))(2) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(TransientError, match="still failing after 3 attempts"):
        retrying(flaky, waits=(0.0, 0.0))(5)
    calls.clear()

    def denied():
        calls.append(1)
        raise AccessDeniedError("s3://b: access denied")

    with pytest.raises(AccessDeniedError):
        retrying(denied, waits=(0.0, 0.0))()
    assert len(calls) == 1  # not retried: waiting does not fix a permission


def test_retrying_keeps_the_task_name():
    def body():
        return 1

    assert retrying(body).__name__ == "body"
    assert errors.RETRY_WAITS == (1.0, 2.0, 4.0, 8.0, 16.0)


def test_stop_token_commit_section_is_the_truth():
    """A stop requested while a commit runs waits for it; one requested before
    refuses to start it; after close() nothing can commit."""
    from fruitdask.cancel import StopToken

    stop = StopToken()
    inside, release = threading.Event(), threading.Event()
    done = []

    def commit():
        with stop.critical():
            inside.set()
            release.wait(30)
            stop.committed = "run1"
            done.append(True)

    t = threading.Thread(target=commit)
    t.start()
    assert inside.wait(30)
    stop.request(15)
    closer = threading.Thread(target=stop.close)
    closer.start()
    release.set()
    closer.join(30)
    t.join(30)
    assert done and stop.committed == "run1"  # the commit in flight completed
    with pytest.raises(Cancelled), stop.critical():
        pass  # nothing commits after a stop


def test_stop_callbacks_run_once_even_when_registered_late():
    from fruitdask.cancel import StopToken

    stop, seen = StopToken(), []
    stop.on_stop(lambda: seen.append("early"))
    remove = stop.on_stop(lambda: seen.append("removed"))
    remove()
    stop.request(2)
    stop.fire()
    stop.fire()
    stop.on_stop(lambda: seen.append("late"))
    assert seen == ["early", "late"]
