"""Folder replacement: the new folder lands whole, the old one goes, and no moment has neither."""

import sys
from pathlib import Path

import pytest

from rayexit import files


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_two_folders_swap_in_one_step(tmp_path):
    first, second = folder(tmp_path / "a", "new"), folder(tmp_path / "b", "old")
    assert files.exchange_paths(first, second)
    assert (second / "weights").read_text() == "new" and (first / "weights").read_text() == "old"


def test_a_missing_path_is_not_swapped_and_nothing_moves(tmp_path):
    first = folder(tmp_path / "a", "new")
    assert not files.exchange_paths(first, tmp_path / "absent")
    assert (first / "weights").read_text() == "new" and not (tmp_path / "absent").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replacing_a_folder_never_renames_the_target_away(tmp_path, monkeypatch):
    staging, target = folder(tmp_path / ".m.tmp", "new"), folder(tmp_path / "m", "old")
    renamed = []
    monkeypatch.setattr(Path, "rename", lambda self, to: renamed.append(self))  # the two-rename path records here
    files.replace_dir(staging, target)
    assert renamed == []
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old folder is gone with the staging name


@pytest.mark.parametrize("target_exists", [True, False])
def test_where_folders_cannot_swap_two_renames_give_the_same_result(tmp_path, monkeypatch, target_exists):
    monkeypatch.setattr(files, "exchange_paths", lambda first, second: False)
    staging = folder(tmp_path / ".m.tmp", "new")
    if target_exists:
        folder(tmp_path / "m", "old")
    files.replace_dir(staging, tmp_path / "m")
    assert (tmp_path / "m" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
