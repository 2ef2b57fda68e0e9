"""Atomic outputs: files and run directories appear whole, with normal permissions, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from svfit.train import results
from svfit.train.results import staged_directory, write_json


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_outputs_get_the_modes_umask_gives_ordinary_files(tmp_path, monkeypatch, umask, file_mode, dir_mode):
    monkeypatch.setattr(results, "_UMASK", umask)  # the process umask, read once at import
    write_json(tmp_path / "r.json", {"a": 1})
    with staged_directory(tmp_path / "run") as stage:
        (stage / "x").write_text("x")
    assert mode(tmp_path / "r.json") == file_mode
    assert mode(tmp_path / "run") == dir_mode
    assert (tmp_path / "run" / "x").read_text() == "x"


def test_a_failed_body_leaves_the_previous_run_and_no_debris(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with staged_directory(out) as stage:
            (stage / "half").write_text("h")
            raise RuntimeError("training crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (out / "old.txt").read_text() == "previous"


def test_a_failed_final_move_restores_the_previous_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real_replace = os.replace

    def flaky(src, dst):
        if str(src).startswith(str(tmp_path / ".run.partial-")):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(results.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with staged_directory(out) as stage:
            (stage / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_write_json_failure_leaves_no_temp_file(tmp_path):
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json(tmp_path / "r.json", circular)
    assert list(tmp_path.iterdir()) == []
