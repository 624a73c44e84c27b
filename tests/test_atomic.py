"""Atomic writers: normal permissions for new files, no partial or leftover files on failure."""

import os
import stat

import pytest

from hf_vgrefine.atomic import atomic_output, atomic_write
from hf_vgrefine.vgrefine import VGRefineConfig
from hf_vgrefine.viz import new_figure, save_figure


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_umask_permissions(tmp_path, umask022):
    assert _mode(atomic_write(tmp_path / "a.json", "{}\n")) == 0o644
    fig = new_figure((2, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    assert _mode(save_figure(fig, tmp_path / "f.png")) == 0o644
    cfg = VGRefineConfig(masked_layers=[1], sensitive_heads=[[0, 1]])
    assert _mode(cfg.save_pretrained(tmp_path / "cfg")) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.json", "cfg", "f.png"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]
    atomic_write(target, b"new\n", fsync=True)
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.txt"]
