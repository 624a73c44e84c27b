"""Cache of generic-prompt attention maps: an in-memory LRU with an optional on-disk store.

The generic prompt ("Write a general description of the image.") depends only on the image, so its maps
are computed once per image and reused by every question about it (VGRefine's triage, grounding
measurement). On disk each entry is one ``safetensors`` file under ``directory/<namespace>/``, named by the
SHA-1 of its key; ``namespace`` is the model's fingerprint (:func:`model_fingerprint`), so maps of
another model — or of the same architecture with other weights or dtype — are never read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)


_VOLATILE = ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures")


def _stable(d):
    if isinstance(d, dict):
        return {str(k): _stable(v) for k, v in d.items()
                if k not in _VOLATILE and not str(k).startswith("_attn_implementation")}
    if isinstance(d, (list, tuple)):
        return [_stable(v) for v in d]
    return d


def model_fingerprint(model, samples_per_tensor: int = 256) -> str:
    """SHA-1 of a model's class, config (without its path and dtype labels), and the name, dtype, shape and a
    strided sample of every parameter tensor.

    Two models with the same architecture but different weights get different fingerprints; the cost is
    ``samples_per_tensor`` values per tensor (milliseconds, also for 7B models).
    """
    h = hashlib.sha1()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:   # architecture settings; where it was loaded from and dtype labels do not count
        h.update(json.dumps(_stable(cfg.to_dict()), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            h.update(str(tuple(p.shape)).encode())
            if p.device.type != "meta":     # offloaded (accelerate) parameters have no data here
                h.update(flat[::step][:samples_per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()


class GenericMapCache:
    """LRU of generic-prompt maps keyed by a tuple (image content hash, query mode, layers, prompt …).

    ``max_items``: entries kept in memory (0: none). ``directory``: also persist entries there (read back when not in
    memory). ``namespace``: sub-folder of ``directory`` (a string, or a callable evaluated on first disk use,
    e.g. ``lambda: model_fingerprint(model)``). Values are ``torch.Tensor`` or ``numpy.ndarray``.
    ``hits``/``misses`` count :meth:`get` results; ``disk_hits`` the hits read from disk.
    """

    def __init__(self, max_items: int = 512, directory: str | os.PathLike | None = None,
                 namespace: str | Callable[[], str] = "default"):
        if int(max_items) < 0:
            raise ValueError(f"max_items must be >= 0 (0 = keep nothing in memory), got {max_items}")
        self.max_items = int(max_items)
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._namespace = namespace
        self.data: OrderedDict = OrderedDict()
        self.hits = self.misses = self.disk_hits = 0

    # ------------------------------------------------------------------ memory
    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key) -> bool:
        path = self._path(key)
        return key in self.data or (path is not None and path.is_file())

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk stay)."""
        self.data.clear()

    def _remember(self, key, value) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.max_items:
            self.data.popitem(last=False)

    def get(self, key):
        """The cached value, or ``None``."""
        if key in self.data:
            self.data.move_to_end(key)
            self.hits += 1
            return self.data[key]
        value = self._load(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.disk_hits += 1
        self._remember(key, value)
        return value

    def put(self, key, value) -> None:
        """Store ``value`` (in memory, and on disk when a directory is set)."""
        self._remember(key, value)
        self._save(key, value)

    # ------------------------------------------------------------------ disk
    @property
    def namespace(self) -> str:
        if callable(self._namespace):
            self._namespace = str(self._namespace())
        return self._namespace

    def _path(self, key) -> Path | None:
        if self.directory is None:
            return None
        name = hashlib.sha1(repr(key).encode()).hexdigest()
        return self.directory / self.namespace / f"{name}.safetensors"

    def _save(self, key, value) -> None:
        path = self._path(key)
        if path is None:
            return
        from safetensors.numpy import save

        from .atomic import atomic_write

        kind = "torch" if torch.is_tensor(value) else "numpy"
        arr = value.detach().float().cpu().numpy() if kind == "torch" else np.asarray(value)
        data = save({"map": np.ascontiguousarray(arr)}, metadata={"key": repr(key), "kind": kind,
                                                                  "dtype": str(value.dtype)})
        try:
            atomic_write(path, data)
        except OSError as err:  # the disk store is optional: warn once, then keep entries in memory only
            logger.warning("generic-map cache directory %s is unusable (%s: %s); continuing with the in-memory cache "
                           "only (pass a writable cache_dir / --generic-cache-dir to persist the maps)",
                           self.directory, type(err).__name__, err)
            self.directory = None

    def _load(self, key):
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arr = f.get_tensor("map")
        except Exception as err:  # noqa: BLE001 - any unreadable file: recompute instead of guessing
            logger.warning("generic-map cache file %s is unreadable (%s); recomputing it", path, err)
            return None
        if meta.get("key") != repr(key):
            logger.warning("generic-map cache file %s belongs to another key; recomputing it", path)
            return None
        if meta.get("kind") == "torch":
            dtype = getattr(torch, meta.get("dtype", "torch.float32").removeprefix("torch."), torch.float32)
            return torch.from_numpy(arr.copy()).to(dtype)
        return arr
