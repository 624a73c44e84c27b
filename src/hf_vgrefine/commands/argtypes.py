"""``argparse`` ``type=`` validators of the sub-commands: a bad value is a usage error naming what to give."""

from __future__ import annotations

import argparse
import os

from ..outdir import model_reference_error

__all__ = ["existing_dir", "model_id_or_path", "nonnegative_int", "percentile_value", "positive_int", "torch_device"]


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= {lo}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is not allowed; give an integer >= {lo}")
        return v
    return parse


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    return _int_at_least(1)(text)


def nonnegative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    return _int_at_least(0)(text)


def percentile_value(text: str) -> float:
    """``argparse`` type: a number in [0, 100]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a percentile in [0, 100]") from None
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 100]; give a percentile in [0, 100]")
    return v


def existing_dir(text: str) -> str:
    """``argparse`` type: an existing folder."""
    if not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder; give the folder that holds the data")
    return os.path.expanduser(text)


def torch_device(text: str) -> str:
    """``argparse`` type: a torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; give e.g. cpu, cuda or cuda:0") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device on this machine "
                                         f"({torch.cuda.device_count()} visible); use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    return text


def model_id_or_path(text: str) -> str:
    """``argparse`` type: a local model folder or something shaped like a hub id (``name`` or ``org/name``)."""
    err = model_reference_error(text)
    if err:
        raise argparse.ArgumentTypeError(err)
    return text
