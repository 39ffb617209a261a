"""The one atomic writer (harness.atomic): mode 0644, refused targets, OS failures.

Mount-based cases (a read-only file system, a full one) need root to mount a small
tmpfs; elsewhere they are skipped with that reason. Nothing here depends on the host's
CPU, core count or GPU."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess

import pandas as pd
import pytest

from harness import atomic
from harness.errors import UserError


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@contextlib.contextmanager
def tmpfs(where, size: str, readonly: bool = False):
    """A tmpfs mounted at ``where`` for the test; skips the test where that needs root
    or the container may not mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (read-only / full file system)")
    where.mkdir(exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


# -- what it writes --------------------------------------------------------------------
def test_every_writer_gives_mode_0644_whatever_the_umask(tmp_path):
    old = os.umask(0o077)  # mkstemp's 0600 and a strict umask must both be overridden
    try:
        atomic.write_bytes(tmp_path / "a.bin", b"\x00\x01")
        atomic.write_text(tmp_path / "b.txt", "é")
        atomic.write_json(tmp_path / "c.json", {"x": 1})
        atomic.write_parquet(pd.DataFrame({"v": [1.0, 2.0]}), tmp_path / "d.parquet")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.txt", "c.json", "d.parquet"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é"
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 1\n}\n'
    assert pd.read_parquet(tmp_path / "d.parquet")["v"].tolist() == [1.0, 2.0]
    assert leftovers(tmp_path) == []


def test_a_regular_file_is_replaced_and_parents_are_made_on_request(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    deep = tmp_path / "a" / "b" / "r.html"
    atomic.write_text(deep, "<p>", parents=True)
    assert deep.read_text() == "<p>"


def test_a_serializer_bug_propagates_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise ValueError("bug in a serializer")

    with pytest.raises(ValueError):
        atomic.write_with(target, broken)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


# -- what it refuses -------------------------------------------------------------------
def test_a_symlink_is_refused_and_left_untouched_with_what_it_points_to(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("keep")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with pytest.raises(UserError) as exc:
        atomic.write_bytes(link, b"new", what="--output")
    msg = one_line(exc)
    assert str(link) in msg and "symbolic link" in msg and msg.startswith("--output ")
    assert link.is_symlink() and real.read_text() == "keep" and leftovers(tmp_path) == []


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError) as exc:
        atomic.write_text(fifo, "x")
    assert "FIFO" in one_line(exc) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_a_directory_and_a_device_are_refused(tmp_path):
    with pytest.raises(UserError) as exc:
        atomic.write_text(tmp_path, "x")
    assert "directory" in one_line(exc)
    # /dev/null exists on every Linux machine; nothing is written to it or renamed over it.
    before = os.stat("/dev/null")
    with pytest.raises(UserError) as exc:
        atomic.write_text("/dev/null", "x")
    assert "character device" in one_line(exc) and "/dev/null" in str(exc.value)
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_a_missing_folder_or_a_path_under_a_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as exc:
        atomic.write_text(tmp_path / "nope" / "x.txt", "x")
    assert "does not exist" in one_line(exc)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UserError) as exc:
        atomic.write_text(tmp_path / "f" / "x.txt", "x")
    assert str(tmp_path / "f") in one_line(exc)


def test_stdout_is_not_the_writers_business(tmp_path, monkeypatch):
    # "-" is a file name like any other to the writer; callers map "-" to stdout.
    monkeypatch.chdir(tmp_path)
    atomic.write_text("-", "x")
    assert (tmp_path / "-").read_text() == "x"


# -- OS failures -----------------------------------------------------------------------
def test_a_full_file_system_is_one_line_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    with tmpfs(tmp_path / "mnt", "64k") as mnt:
        target = mnt / "cases.parquet"
        atomic.write_bytes(target, b"old")
        with pytest.raises(UserError) as exc:
            atomic.write_bytes(target, os.urandom(256 * 1024))
        msg = one_line(exc)
        assert str(target) in msg and "No space left on device" in msg
        with pytest.raises(UserError):
            atomic.write_parquet(pd.DataFrame({"v": range(100_000)}), mnt / "big.parquet")
        assert target.read_bytes() == b"old" and leftovers(mnt) == [] and not (mnt / "big.parquet").exists()


def test_a_read_only_file_system_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "64k", readonly=True) as ro:
        with pytest.raises(UserError) as exc:
            atomic.write_text(ro / "report.html", "x")
        assert "Read-only file system" in one_line(exc) and str(ro / "report.html") in str(exc.value)
        with pytest.raises(UserError) as exc:
            atomic.check_output_dir(ro)
        assert "Read-only file system" in one_line(exc)


# -- output folders (run --out) --------------------------------------------------------
def test_check_output_dir_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "results"
    assert atomic.check_output_dir(out) == out  # missing: its parent is checked instead
    assert list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    assert atomic.check_output_dir(out) == out
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "under_file", "dev_null", "proc", "fifo", "under_fifo", "proc_sub"])
def test_check_output_dir_refuses_unusable_folders_in_one_line(tmp_path, kind):
    (tmp_path / "f").write_text("a file")
    os.mkfifo(tmp_path / "p")
    target = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "sub", "dev_null": "/dev/null",
              "proc": "/proc", "fifo": tmp_path / "p", "under_fifo": tmp_path / "p" / "sub",
              "proc_sub": "/proc/coherence-results"}[kind]
    with pytest.raises(UserError) as exc:
        atomic.check_output_dir(target)
    msg = one_line(exc)
    assert msg.startswith(f"--out {target}:")
    assert (tmp_path / "f").read_text() == "a file"
