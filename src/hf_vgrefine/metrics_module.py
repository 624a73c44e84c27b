"""The ``grounding_ratio`` evaluate module: load it, install it for offline ``evaluate.load``, publish it.

The module script ships inside the package (``hf_vgrefine/resources/grounding_ratio/``) and only
delegates to :mod:`hf_vgrefine.metrics`.

* :func:`load_grounding_metric` — ``evaluate.load`` on the packaged script (works offline, any cwd).
* :func:`install_metric` — copies the script into evaluate's module cache at the place where
  ``evaluate.load("grounding_ratio")`` falls back to when the Hub cannot be reached, so the bare
  name works offline (``HF_HUB_OFFLINE=1``) from any working directory.
* :func:`publish_metric` — uploads the module as a community metric Space (needs network and a token).

evaluate 0.4.6 resolves a bare name ``NAME`` in this order: ``./NAME/NAME.py`` in the working
directory, the canonical Hub Spaces ``evaluate-{metric,comparison,measurement}/NAME``, and then,
when those fail, the newest cached copy
``<HF_MODULES_CACHE>/evaluate_modules/metrics/evaluate-metric--NAME/<64-hex hash>/NAME.py``
(newest = latest modification time of ``NAME.py``; the hash folder name only needs 64 characters).
``HF_MODULES_CACHE`` defaults to ``$HF_HOME/modules`` (``HF_HOME`` defaults to
``$XDG_CACHE_HOME/huggingface``, i.e. ``~/.cache/huggingface``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

METRIC_NAME = "grounding_ratio"
_FILES = (f"{METRIC_NAME}.py", "README.md")


def metric_module_dir() -> Path:
    """Folder of the evaluate module shipped in the installed package (contains ``grounding_ratio.py``)."""
    path = Path(str(resources.files("hf_vgrefine") / "resources" / METRIC_NAME))
    if not (path / f"{METRIC_NAME}.py").is_file():  # pragma: no cover - broken install
        raise FileNotFoundError(f"the packaged evaluate module is missing: {path}/{METRIC_NAME}.py")
    return path


def load_grounding_metric(**kwargs: Any):
    """``evaluate.load`` of the packaged ``grounding_ratio`` module (offline-safe; kwargs go to ``evaluate.load``)."""
    import evaluate

    return evaluate.load(str(metric_module_dir()), **kwargs)


def modules_cache_dir() -> Path:
    """The folder evaluate uses as ``HF_MODULES_CACHE`` in a process started with the current environment.

    Inside a process that already imported evaluate, evaluate's own (import-time) value is returned.
    """
    evaluate_config = sys.modules.get("evaluate.config")
    if evaluate_config is not None:
        return Path(evaluate_config.HF_MODULES_CACHE)
    explicit = os.environ.get("HF_MODULES_CACHE")
    if explicit:
        return Path(explicit)
    hf_home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    return Path(os.path.expanduser(hf_home)) / "modules"


def installed_metric_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/evaluate_modules/metrics/evaluate-metric--grounding_ratio`` (holds one folder per version)."""
    root = Path(cache_dir) if cache_dir is not None else modules_cache_dir()
    return root / "evaluate_modules" / "metrics" / f"evaluate-metric--{METRIC_NAME}"


def install_metric(cache_dir: str | os.PathLike | None = None) -> Path:
    """Install the packaged module so that bare ``evaluate.load("grounding_ratio")`` works offline.

    ``cache_dir``: evaluate's modules cache (default: :func:`modules_cache_dir`, i.e.
    ``$HF_MODULES_CACHE`` or ``$HF_HOME/modules``). Writes
    ``<cache_dir>/evaluate_modules/metrics/evaluate-metric--grounding_ratio/<sha256>/grounding_ratio.py``
    (+ README and the ``__init__.py`` files the import system needs). The version folder is built in
    a temporary folder next to it and renamed into place (atomic); re-installing the same version only
    refreshes its modification time so it stays the newest cached one. Returns the installed script.
    """
    src = metric_module_dir()
    script = (src / f"{METRIC_NAME}.py").read_bytes()
    digest = hashlib.sha256(script).hexdigest()  # 64 hex characters, as evaluate's cache expects
    metric_dir = installed_metric_dir(cache_dir)
    metric_dir.mkdir(parents=True, exist_ok=True)
    for pkg in (metric_dir.parent.parent.parent, metric_dir.parent.parent, metric_dir.parent, metric_dir):
        (pkg / "__init__.py").touch(exist_ok=True)
    final = metric_dir / digest
    target = final / f"{METRIC_NAME}.py"
    if not (target.is_file() and target.read_bytes() == script):
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-install-", dir=metric_dir))
        try:
            for name in _FILES:
                shutil.copyfile(src / name, tmp / name)
            (tmp / "__init__.py").touch()
            os.chmod(tmp, 0o755)
            stale = None
            if final.exists():  # same hash but different/incomplete content: move it aside first
                stale = Path(tempfile.mkdtemp(prefix=".tmp-stale-", dir=metric_dir))
                os.replace(final, stale / "old")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (target.is_file() and target.read_bytes() == script):  # not a concurrent twin
                    raise
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(target)  # newest cached version wins in evaluate's fallback
    return target


def publish_metric(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload the module to the Hub as a community metric Space ``repo_id`` (``"user/grounding_ratio"``).

    Creates (or reuses) a Gradio Space with the script, its README, an ``app.py`` showing evaluate's
    standard widget and a ``requirements.txt``; afterwards ``evaluate.load(repo_id)`` works online
    for anyone who has ``hf_vgrefine`` installed. Needs network access and a write token. Returns the
    Space URL. Not exercised by the test-suite.
    """
    from huggingface_hub import HfApi

    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'user/{METRIC_NAME}', got {repo_id!r}")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in _FILES:
            shutil.copyfile(metric_module_dir() / name, folder / name)
        # the Hub loader looks for <repo name>.py
        space_name = repo_id.split("/")[1]
        if space_name != METRIC_NAME:
            os.replace(folder / f"{METRIC_NAME}.py", folder / f"{space_name}.py")
        (folder / "app.py").write_text(
            "import evaluate\n"
            "from evaluate.utils import launch_gradio_widget\n\n"
            f'module = evaluate.load("{repo_id}")\n'
            "launch_gradio_widget(module)\n"
        )
        (folder / "requirements.txt").write_text("evaluate>=0.4.6\nhf_vgrefine\n")
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(folder),
                          commit_message=f"Upload {METRIC_NAME} evaluate module")
    return f"https://huggingface.co/spaces/{repo_id}"
