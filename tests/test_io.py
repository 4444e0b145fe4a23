"""Folders written whole: a replaced folder changes only once its copy is complete; a shared cache keeps the first copy."""

import pytest

from sdpo.io import write_folder_atomic


def _fill(text):
    def fill(staging):
        (staging / "file.txt").write_text(text)

    return fill


def test_a_folder_is_replaced_only_once_its_copy_is_whole(tmp_path):
    folder = tmp_path / "out"
    write_folder_atomic(folder, _fill("old"))

    def broken(staging):
        (staging / "file.txt").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_folder_atomic(folder, broken)
    assert (folder / "file.txt").read_text() == "old"
    write_folder_atomic(folder, _fill("new"))
    assert (folder / "file.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def _whole(folder):
    return (folder / "file.txt").is_file()


def test_a_cache_filled_by_another_process_meanwhile_is_kept(tmp_path):
    """Two ranks of one launch convert the same model: the one that finishes second must not delete the first's copy."""
    folder = tmp_path / "models" / "smollm2-135m"

    def other_process_wins(staging):
        write_folder_atomic(folder, _fill("first"), keep=_whole)  # the other process, done while we still fill
        (staging / "file.txt").write_text("second")

    assert write_folder_atomic(folder, other_process_wins, keep=_whole) == folder
    assert (folder / "file.txt").read_text() == "first"
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]


def test_a_cache_left_incomplete_is_replaced(tmp_path):
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "partial.bin").write_text("a copy from before folders were written whole")
    write_folder_atomic(folder, _fill("whole"), keep=_whole)
    assert [p.name for p in folder.iterdir()] == ["file.txt"]


def test_a_copy_renamed_into_place_between_the_check_and_the_rename_is_kept(tmp_path, monkeypatch):
    """The narrowest race: the other process's rename lands after this one looked, so this rename fails."""
    from pathlib import Path

    folder = tmp_path / "models" / "smollm2-135m"
    rename = Path.rename

    def late_rival(self, target):  # another process's whole copy lands just before each rename
        target = Path(target)
        if not target.exists():
            target.mkdir()
            (target / "file.txt").write_text("first")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", late_rival)
    write_folder_atomic(folder, _fill("second"), keep=_whole)
    assert (folder / "file.txt").read_text() == "first"
    with pytest.raises(OSError):  # without `keep`, such a failure is the caller's to see
        write_folder_atomic(tmp_path / "plain", _fill("x"))
