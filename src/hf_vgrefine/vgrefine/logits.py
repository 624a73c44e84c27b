"""``VGRefineLogitsProcessor``: the part of VGRefine that lives inside ``generate``'s decoding loop."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class VGRefineLogitsProcessor(LogitsProcessor):
    """Switches the knockout off after the prefill (``knockout_scope="prefill"``) or keeps it on
    (``"all_steps"``), optionally restricts the first answer token to ``answer_choices`` (token ids, e.g.
    the option letters of a closed-ended question), and records per-step diagnostics in ``self.steps``.

    Built by :meth:`VGRefineWrapper.logits_processor` (or internally by ``VGRefineWrapper.generate``); it
    can be placed in a user's own ``LogitsProcessorList``. Must run while the wrapper's knockout is active
    (inside ``with wrapper:``), otherwise it raises at the first step instead of returning unrefined text.
    """

    def __init__(self, state, knockout_scope: str = "prefill", answer_choices: list[int] | None = None,
                 masked_layers=()):
        self.state = state
        self.knockout_scope = knockout_scope
        self.answer_choices = None if answer_choices is None else torch.as_tensor(answer_choices, dtype=torch.long)
        self.masked_layers = tuple(masked_layers)
        self.steps: list[dict] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from ..attention import current_state

        step = len(self.steps)
        if step == 0:
            if current_state() is not self.state:
                raise RuntimeError("VGRefineLogitsProcessor used outside its VGRefineWrapper context: call "
                                   "model.generate inside `with wrapper:` after wrapper.logits_processor(**inputs)")
            missing = [l for l in self.masked_layers if self.state.calls.get(l, 0) == 0]
            if missing and self.state.biases:
                raise RuntimeError(f"the knockout did not reach layers {missing}; the model is not using the "
                                   "'vgrefine' attention implementation")
            if self.answer_choices is not None:
                allowed = torch.full_like(scores, float("-inf"))
                allowed[:, self.answer_choices.to(scores.device)] = 0.0
                scores = scores + allowed
        probs = scores.float().softmax(-1)
        top = probs.max(-1)
        self.steps.append({
            "step": step,
            "knockout_active": bool(self.state.bias_enabled and self.state.biases),
            "top_token": top.indices.tolist(),
            "top_prob": top.values.tolist(),
        })
        if step == 0 and self.knockout_scope == "prefill":
            self.state.bias_enabled = False
        return scores
