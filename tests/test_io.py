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


def test_a_cache_filled_by_another_process_meanwhile_is_kept(tmp_path):
    """Two ranks of one launch convert the same model: the one that finishes second must not delete the first's copy."""
    folder = tmp_path / "models" / "smollm2-135m"

    def other_process_wins(staging):
        write_folder_atomic(folder, _fill("first"), keep_existing=True)  # the other process, done while we still fill
        (staging / "file.txt").write_text("second")

    assert write_folder_atomic(folder, other_process_wins, keep_existing=True) == folder
    assert (folder / "file.txt").read_text() == "first"
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]
