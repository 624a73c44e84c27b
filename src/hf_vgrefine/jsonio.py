"""Strict JSON: one conversion of run settings, results and configs to JSON values, and atomic JSON files.

:func:`json_safe` is what every run record goes through (measurement ``run.json`` / ``summary.json``,
calibration configs, Med-VQA manifests and resume keys), so the same value is written the same way
everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .atomic import atomic_write

__all__ = ["json_safe", "write_json"]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values.

    Dataclasses -> their fields; objects with ``to_dict()`` -> that dict; mappings -> dicts with string
    keys; lists, tuples, sets and numpy arrays -> lists; numpy scalars -> Python numbers; non-finite
    floats (NaN, ±inf) -> ``None``; anything else that JSON cannot hold -> its ``repr``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, np.ndarray):
        try:
            return json_safe(obj.to_dict())
        except Exception:  # noqa: BLE001 - a broken to_dict is recorded by its repr
            return repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, str) or obj is None:
        return obj
    return repr(obj)


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> str:
    """Write ``json_safe(obj)`` to ``path`` atomically (indent 2, strict JSON, trailing newline)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, text, fsync=fsync)
