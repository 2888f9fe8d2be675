"""Storage: listing, reading many objects with typed per-object errors, writing,
create-only and compare-and-swap writes; local disk and SeaweedFS."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fruitdask import io
from fruitdask.errors import InputError, NotFoundError, StorageError, TransientError


@given(st.lists(st.binary(min_size=1, max_size=12), min_size=2, max_size=6, unique=True))
@settings(max_examples=300, deadline=None)
def test_display_names_are_one_to_one(names):
    shown = [io.display_name(n) for n in names]
    assert len(set(shown)) == len(names)
    for s in shown:
        s.encode("utf-8")  # always valid UTF-8


def test_display_name_escapes_the_backslash_too():
    assert io.display_name(b"caf\xe9") == "caf\\xe9"
    assert io.display_name("caf\\xe9") == "caf\\\\xe9"  # a literal backslash is doubled
    assert io.display_name("Apple Braeburn/0_100.jpg") == "Apple Braeburn/0_100.jpg"


def test_label_and_split_from_the_path():
    assert io.label_split("Training/Apple Braeburn/0_100.jpg") == ("Apple Braeburn", "Training")
    assert io.label_split("test/Kiwi/x.png") == ("Kiwi", "Test")
    assert io.label_split("x.jpg") == ("", None)


def test_list_files_records_size_and_mtime(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "1.jpg").write_bytes(b"x" * 10)
    (tmp_path / "A" / "2.JPEG").write_bytes(b"y" * 20)
    (tmp_path / "A" / "notes.txt").write_text("not an image")
    df = io.list_files(str(tmp_path))
    assert list(df["path"]) == ["A/1.jpg", "A/2.JPEG"]
    assert list(df["size"]) == [10, 20]
    before = int(df["mtime"][0])
    os.utime(tmp_path / "A" / "1.jpg", ns=(before + 10**9, before + 10**9))
    assert int(io.list_files(str(tmp_path))["mtime"][0]) == before + 10**9


def test_listing_errors_are_typed(tmp_path):
    with pytest.raises(NotFoundError, match="not found"):
        io.list_files(str(tmp_path / "nope"))
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        io.list_files(str(tmp_path / "f.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files found"):
        io.list_files(str(tmp_path / "empty"))


def test_reads_yield_typed_errors_in_place(tmp_path):
    (tmp_path / "good.jpg").write_bytes(b"good")
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    got = list(io.iter_objects(str(tmp_path), ["good.jpg", "gone.jpg", "big.jpg"], max_bytes=50))
    assert got[0] == b"good"
    assert isinstance(got[1], NotFoundError) and "gone.jpg" in str(got[1])
    assert isinstance(got[2], StorageError) and "too large" in str(got[2])


def test_a_fifo_never_blocks_a_read(tmp_path):
    """A file swapped for a FIFO after listing used to hang its task for good."""
    os.mkfifo(tmp_path / "pipe.jpg")
    done = threading.Event()
    box = []

    def read():
        box.extend(io.iter_objects(str(tmp_path), ["pipe.jpg"]))
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(60), "the read of a FIFO blocked"
    assert isinstance(box[0], StorageError) and "a FIFO" in str(box[0])


@pytest.mark.parametrize("kind", ["loop", "dangling", "device"])
def test_odd_files_are_errors_not_crashes(tmp_path, kind):
    if kind == "loop":
        os.symlink("loop.jpg", tmp_path / "loop.jpg")
        name, needle = "loop.jpg", "symbolic link loop"
    elif kind == "dangling":
        os.symlink(tmp_path / "missing", tmp_path / "dangling.jpg")
        name, needle = "dangling.jpg", "broken symbolic link"
    else:
        os.symlink("/dev/zero", tmp_path / "zero.jpg")
        name, needle = "zero.jpg", "a character device"
    listed = list(io.list_files(str(tmp_path))["path"])
    assert listed == [name]  # listed: its read says why it has no image
    (got,) = io.iter_objects(str(tmp_path), [name])
    assert isinstance(got, StorageError) and needle in str(got), got


def test_raw_names_are_read_by_their_bytes(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"bytes")
    df = io.list_files(str(tmp_path))
    assert list(df["path"]) == ["caf\\xe9.jpg"]
    assert list(io.iter_objects(str(tmp_path), list(df["source"]))) == [b"bytes"]


def test_put_if_absent_and_replace_if_locally(tmp_path):
    url = str(tmp_path / "x" / "lock.json")
    assert io.put_if_absent(url, b"one")
    assert not io.put_if_absent(url, b"two")
    text, version = io.read_versioned(url)
    assert text == "one"
    assert io.replace_if(url, b"three", version)
    assert not io.replace_if(url, b"four", version)  # the version moved on
    assert io.read_text(url) == "three"
    assert io.read_versioned(str(tmp_path / "none")) == (None, None)
    # compare-and-delete: not at an old version; at the current one the object
    # goes, and the swap's guard file with it (nothing left in the folder)
    _, current = io.read_versioned(url)
    assert not io.delete_if(url, version) and io.read_text(url) == "three"
    assert io.delete_if(url, current)
    assert not io.delete_if(url, current)
    assert list((tmp_path / "x").iterdir()) == []


@pytest.mark.s3
def test_put_if_absent_and_replace_if_on_s3(s3):
    url = f"{s3.make_bucket()}/x/lock.json"
    so = s3.storage_options
    assert io.put_if_absent(url, b"one", so)
    assert not io.put_if_absent(url, b"two", so)
    text, version = io.read_versioned(url, so)
    assert text == "one"
    assert io.replace_if(url, b"three", version, so)
    assert not io.replace_if(url, b"four", version, so)
    assert io.read_text(url, so) == "three"
    _, current = io.read_versioned(url, so)
    assert not io.delete_if(url, version, so) and io.read_text(url, so) == "three"
    assert io.delete_if(url, current, so) and io.read_text(url, so) is None
    assert not io.delete_if(url, current, so)


@pytest.mark.s3
@pytest.mark.parametrize("client", ["arrow", "s3fs"])
def test_s3_reads_through_both_clients(s3, tmp_path, client):
    bucket = s3.make_bucket()
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "1.jpg").write_bytes(b"one")
    s3.upload_tree(tmp_path, f"{bucket}/in")
    so = {**s3.storage_options, "s3_client": client}
    df = io.list_files(f"{bucket}/in", so)
    assert list(df["path"]) == ["A/1.jpg"] and int(df["mtime"][0]) > 0
    got = list(io.iter_objects(f"{bucket}/in", ["A/1.jpg", "A/none.jpg"], so))
    assert got[0] == b"one" and isinstance(got[1], NotFoundError)


def test_unaddressable_s3_keys_get_an_error(s3):
    got = list(io.iter_objects(f"{s3.make_bucket()}/in", ["Pear/../x.jpg", "a//b.jpg"],
                               s3.storage_options))  # fmt: skip
    assert all(isinstance(g, StorageError) and "cannot fetch exactly" in str(g) for g in got)


def test_an_unknown_s3_client_is_one_line():
    with pytest.raises(InputError, match="s3_client must be one of"):
        io.filesystem("s3://b/x", {"s3_client": "boto"})


def test_a_refused_endpoint_is_reported_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    # one TCP connection, no client and no retries behind it
    with pytest.raises(TransientError, match="cannot reach the storage endpoint"):
        io.check_reachable("s3://b/x", {"endpoint_url": f"http://127.0.0.1:{port}"})


def test_remove_deletes_only_what_it_is_given(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    io.remove([str(tmp_path / "a"), str(tmp_path / "missing")])
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_write_bytes_is_atomic_locally(tmp_path):
    url = str(tmp_path / "d" / "f")
    io.write_bytes(url, b"1")
    io.write_bytes(url, b"2")
    assert os.listdir(tmp_path / "d") == ["f"]  # no temp file left
    with pytest.raises(InputError, match="is a file, not a folder"):
        io.check_writable(str(tmp_path / "d" / "f" / "under"))
