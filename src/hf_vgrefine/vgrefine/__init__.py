"""VGRefine: training-free attention triage + knockout at inference time.

Names are imported lazily: ``from hf_vgrefine.vgrefine import INSTRUCTION`` does not load transformers'
modelling code.
"""

import importlib

_LAZY = {
    "GENERIC_QUESTION": ".config", "INSTRUCTION": ".config", "PRESETS": ".config", "VGRefineConfig": ".config",
    "VGRefineLogitsProcessor": ".logits",
    "knockout_set": ".triage", "triage_scores": ".triage",
    "SampleTriage": ".wrapper", "TriageResult": ".wrapper", "VGRefineWrapper": ".wrapper",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
