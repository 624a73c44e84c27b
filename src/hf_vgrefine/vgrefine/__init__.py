"""VGRefine: training-free attention triage + knockout at inference time."""

from .config import GENERIC_QUESTION, INSTRUCTION, PRESETS, VGRefineConfig
from .logits import VGRefineLogitsProcessor
from .triage import knockout_set, triage_scores
from .wrapper import SampleTriage, TriageResult, VGRefineWrapper

__all__ = ["GENERIC_QUESTION", "INSTRUCTION", "PRESETS", "SampleTriage", "TriageResult", "VGRefineConfig",
           "VGRefineLogitsProcessor", "VGRefineWrapper", "knockout_set", "triage_scores"]
