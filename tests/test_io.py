import os

import pytest

from tfg_core.io import atomic_path, atomic_write_text, sha256_file


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    atomic_write_text(target, "a,b\n3,4\n")
    assert target.read_text() == "a,b\n3,4\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]  # no temp files left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.csv"]


def test_temp_keeps_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")


def test_sha256(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_files_get_ordinary_permissions(tmp_path):
    """Not mkstemp's private 0600: results are shared with colleagues and read by other tools."""
    import os

    from tfg_core.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "result.csv", "a\n")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
