"""Output folders the package writes: mark what it creates, never delete what it did not create.

Rule for every command that writes a folder:

* a folder the package creates gets a marker file (:data:`MARKER`) naming the command that made it;
* a folder that already exists and holds files but no marker is *foreign*: the command refuses to
  write into it (clear message) unless told to (``overwrite=True`` / ``--overwrite``), and even then it
  only replaces its own outputs and keeps every other file;
* results are written into a staging folder next to the destination and renamed into place;
* a previous output is removed only if it carries the marker.

(The CLIs' ``argparse`` validators are in :mod:`hf_vgrefine.commands.argtypes`.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MARKER = ".hf_vgrefine-output"


class ForeignOutputError(FileExistsError):
    """The destination folder holds files this package did not write."""


def is_marked(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder created by this package (it holds :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def mark(path: str | os.PathLike, command: str) -> None:
    """Write the marker into ``path`` (created if missing)."""
    from .atomic import atomic_write

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if not is_marked(p):
        atomic_write(p / MARKER, json.dumps({"created_by": f"hf_vgrefine {command}",
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def claim_output_dir(path: str | os.PathLike, command: str, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Make ``path`` this command's output folder, or raise :class:`ForeignOutputError`.

    A missing or empty folder is created and marked; a marked folder is reused; a folder with other
    files is refused unless ``overwrite`` (then it is marked and its other files are kept)."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ForeignOutputError(f"{p} exists and is not a folder; choose another output folder")
    if p.is_dir() and not is_marked(p) and any(p.iterdir()) and not overwrite:
        names = sorted(e.name for e in p.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ForeignOutputError(
            f"{p} already holds files not written by hf-vgrefine {command} ({shown}); choose an empty or new "
            f"output folder, or pass {flag} to write into it anyway (files that {command} does not write are kept)")
    mark(p, command)
    return p


def make_stage(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden staging folder ``parent/.<name>.partial-<pid>-XXXX`` (same file system as the target)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def replace_dir(staged: str | os.PathLike, target: str | os.PathLike) -> Path | None:
    """Move ``staged`` to ``target``. A marked old ``target`` is removed; an unmarked one (not ours) is
    renamed to ``<target>.old-<timestamp>`` and kept. Returns the kept folder, if any."""
    staged, target = Path(staged), Path(target)
    kept = None
    if target.exists():
        if is_marked(target):
            trash = target.parent / f".{target.name}.trash-{os.getpid()}-{time.time_ns()}"
            os.replace(target, trash)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
            return None
        kept = target.parent / f"{target.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(target, kept)
    os.replace(staged, target)
    return kept


class StagedDir:
    """Context manager: a marked staging folder (:attr:`path`) that replaces ``parent/name`` when the block
    succeeds (:func:`replace_dir`; an unmarked old folder is kept, :attr:`kept`); the staging folder, ours,
    is removed in every case."""

    def __init__(self, parent: str | os.PathLike, name: str, command: str):
        self.parent, self.name, self.command = Path(parent), name, command
        self.path: Path | None = None
        self.kept: Path | None = None

    def __enter__(self) -> "StagedDir":
        self.path = make_stage(self.parent, self.name)
        mark(self.path, self.command)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.kept = replace_dir(self.path, self.parent / self.name)
        finally:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)   # our own staging folder
        return False


def model_reference_error(text: str) -> str | None:
    """Why ``text`` can be neither a local model folder nor a hub id, or ``None`` if it may be one."""
    import re

    if os.path.isdir(os.path.expanduser(text)):
        return None
    looks_like_path = text.startswith(("/", ".", "~", "\\")) or text.count("/") > 1
    hub_ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", text) is not None \
        and "--" not in text and ".." not in text
    if looks_like_path or not hub_ok:
        return (f"{text!r} is not a local folder and not a hub model id; give an existing folder holding "
                "config.json (e.g. a save_pretrained output) or a hub id like 'org/name'")
    return None
