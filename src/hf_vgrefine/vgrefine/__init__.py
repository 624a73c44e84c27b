"""VGRefine: training-free attention triage + knockout at inference time."""

from .config import PRESETS, VGRefineConfig

__all__ = ["PRESETS", "VGRefineConfig"]
