"""raster.clean_stale_temporaries: what a killed run leaves (atomic_path's `.{name}.{pid}.tmp`) goes, nothing else."""

import os
import subprocess
import sys

import pytest

from raster import atomic_path, clean_stale_temporaries

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process liveness is checked with POSIX signals")


@pytest.fixture
def dead_pid():
    """The pid of a process that has ended and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_temporaries_of_dead_processes_are_removed(tmp_path, dead_pid):
    stale = tmp_path / f".last.pth.{dead_pid}.tmp"
    kept = [tmp_path / f".last.pth.{os.getpid()}.tmp",  # this process is alive and may be writing it
            tmp_path / ".a.png.1.tmp",                   # pid 1 is always running
            tmp_path / "last.pth",                      # the real file
            tmp_path / f"last.pth.{dead_pid}.tmp",       # no leading dot: not atomic_path's naming
            tmp_path / f".last.pth.{dead_pid}.tmp.bak",
            tmp_path / f".last.pth.{dead_pid}x.tmp",
            tmp_path / ".last.pth.tmp",
            tmp_path / "sub" / f".deep.{dead_pid}.tmp"]  # not recursive
    for path in [stale] + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / f".folder.{dead_pid}.tmp").mkdir()  # a folder is never atomic_path's
    assert clean_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()
    assert all(p.exists() for p in kept) and (tmp_path / f".folder.{dead_pid}.tmp").is_dir()
    assert clean_stale_temporaries(tmp_path) == []


def test_the_naming_is_atomic_paths(tmp_path, dead_pid, monkeypatch):
    """The temporary atomic_path really names, under a pid that then dies, is found."""
    monkeypatch.setattr(os, "getpid", lambda: dead_pid)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "last.pth") as tmp:
            raise RuntimeError("only the name is wanted")
    monkeypatch.undo()
    tmp.write_bytes(b"half")  # what kill -9 leaves: atomic_path's clean-up never ran
    assert clean_stale_temporaries(tmp_path) == [tmp]


def test_missing_folder_is_nothing_to_clean(tmp_path):
    assert clean_stale_temporaries(tmp_path / "nope") == []
