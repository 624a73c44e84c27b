"""Source files of the VGMED builder: clear errors, checksum verification, hub downloads.

Every file the builder reads goes through :func:`require_file` (local) or :func:`fetch_hub_file`
(download). A missing file raises :class:`MissingSourceError`, a file that fails its checksum or cannot
be parsed raises :class:`CorruptSourceError`; both name the file and say how to obtain it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
MRICRON_INSTALL_HINT = (
    "install the Debian/Ubuntu package that ships it: `apt-get install -y --no-install-recommends mricron-data` "
    f"(files land in {MRICRON_TEMPLATES}), or pass --data-dir DIR with a copy of ch2.nii.gz, aal.nii.gz and aal.nii.txt"
)
PYDICOM_HINT = "it is bundled with the PyPI package pydicom (>= 3.0): `pip install --force-reinstall pydicom`"

# sha256 of the files as shipped by Debian mricron-data 1.2.20211006+dfsg-4 and pydicom 3.0.x. Another
# package version may ship other bytes: then the files are validated structurally instead (and a
# gzip/CRC or parse failure is still reported as corruption).
PINNED_SHA256 = {
    "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
    "aal.nii.txt": "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e",
    "examples_overlay.dcm": "112539bc17c0e281987397e827dff9e99890109866d570f08761f83b8f55c277",
}

# Public locations of the downloadable sources (docs/data_formats.md § VGMED configurations).
VGMED_RELEASE_REPO = "guimeng-liu/VGMED"
SLAKE_REPO = "BoKelvin/SLAKE"


class VGMEDSourceError(RuntimeError):
    """A source file of the VGMED builder is missing or unusable."""

    def __init__(self, path, problem: str, hint: str = ""):
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        msg = f"VGMED source file {self.path!s}: {problem}."
        if hint:
            msg += f" To obtain it: {hint}."
        super().__init__(msg)


class MissingSourceError(VGMEDSourceError, FileNotFoundError):
    def __init__(self, path, hint: str = "", problem: str = "not found"):
        super().__init__(path, problem, hint)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno-style
        return self.args[0]


class CorruptSourceError(VGMEDSourceError, ValueError):
    def __init__(self, path, problem: str, hint: str = ""):
        super().__init__(path, problem, hint)


# ---------------------------------------------------------------------------------------------------


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1_file(path, chunk: int = 1 << 20) -> str:
    """The git object id of a file (what the Hub reports as etag for non-LFS files)."""
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def require_file(path, hint: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingSourceError(path, hint)
    if path.stat().st_size == 0:
        raise CorruptSourceError(path, "file is empty", hint)
    return path


def check_pinned(path, hint: str, name: str | None = None) -> bool:
    """True if ``path`` matches its pinned sha256, False if it differs or none is pinned.

    A mismatch is not an error by itself (other package versions ship other bytes); callers validate
    the content and raise :class:`CorruptSourceError` when it does not parse.
    """
    expected = PINNED_SHA256.get(name or Path(path).name)
    if expected is None:
        return False
    actual = sha256_file(path)
    if actual != expected:
        logger.warning(
            "%s: sha256 %s differs from the pinned %s (other package version?); validating its content instead",
            path,
            actual,
            expected,
        )
        return False
    return True


def verify_checksum(path, expected_sha256: str, hint: str) -> None:
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise CorruptSourceError(path, f"sha256 {actual} does not match the expected {expected_sha256}", hint)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def fetch_hub_file(repo_id: str, filename: str, *, hint: str, sha256: str | None = None) -> Path:
    """Download one file of a Hub dataset repo and verify it.

    Verification: the Hub cache names each blob by its etag, which is the sha256 of the content for
    LFS files and the git object id for regular files; the downloaded bytes must hash to it. A pinned
    ``sha256`` is checked in addition.
    """
    try:
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as exc:  # offline, not found, HTTP errors: all mean "not obtainable here"
        raise MissingSourceError(
            f"hf://datasets/{repo_id}/{filename}",
            hint,
            problem=f"could not be downloaded ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
        ) from exc
    blob = Path(os.path.realpath(local)).name
    if _HEX64.match(blob):
        if sha256_file(local) != blob:
            raise CorruptSourceError(local, f"content does not match the Hub's sha256 {blob}; delete it and retry", hint)
    elif _HEX40.match(blob):
        if git_blob_sha1_file(local) != blob:
            raise CorruptSourceError(local, f"content does not match the Hub's git id {blob}; delete it and retry", hint)
    if sha256 is not None:
        verify_checksum(local, sha256, hint)
    return local
