"""The console script: every registered command has a working --help (run as a real subprocess)."""

import os
import subprocess
import sys

import pytest

from hf_vgrefine.cli import COMMANDS


def _run(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "hf_vgrefine.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_top_level_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for name, _, _ in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", [c[0] for c in COMMANDS])
def test_command_help(name):
    out = _run(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: hf-vgrefine " + name in out.stdout


def test_unknown_command_is_an_error():
    out = _run("no-such-command")
    assert out.returncode != 0
    assert "invalid choice" in out.stderr
