"""``VGRefineLogitsProcessor``: the part of VGRefine that lives inside ``generate``'s decoding loop."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class VGRefineLogitsProcessor(LogitsProcessor):
    """Checks that the knockout reached its layers, optionally restricts the first answer token to
    ``answer_choices`` (token ids, e.g. the option letters of a closed-ended question), and records per-step
    diagnostics (:attr:`steps`).

    Where the knockout applies is decided by its query rows alone (:class:`~hf_vgrefine.attention.KeyBlock`):
    ``knockout_scope="prefill"`` covers the prompt rows ``[v_end, T)``, so decode steps (positions ``>= T``)
    are untouched; ``"all_steps"`` leaves the rows open-ended. This processor never switches it.

    Built by :meth:`VGRefineWrapper.logits_processor` (or internally by ``VGRefineWrapper.generate``); it
    can be placed in a user's own ``LogitsProcessorList``. Must run while the wrapper's knockout is active
    (inside ``with wrapper:``), otherwise it raises at the first step instead of returning unrefined text.
    It reads nothing back to the host: diagnostics stay on the device until :attr:`steps` is read.
    """

    def __init__(self, state, knockout_scope: str = "prefill", answer_choices: list[int] | None = None,
                 masked_layers=()):
        self.state = state
        self.knockout_scope = knockout_scope
        self.answer_choices = None if answer_choices is None else torch.as_tensor(answer_choices, dtype=torch.long)
        self.masked_layers = tuple(masked_layers)
        self._top: list = []
        self._allowed = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from ..attention import current_state

        step = len(self._top)
        if step == 0:
            if current_state() is not self.state:
                raise RuntimeError("VGRefineLogitsProcessor used outside its VGRefineWrapper context: call "
                                   "model.generate inside `with wrapper:` after wrapper.logits_processor(**inputs)")
            missing = [l for l in self.masked_layers if self.state.calls.get(l, 0) == 0]
            if missing and self.state.biases:
                raise RuntimeError(f"the knockout did not reach layers {missing}; the model is not using the "
                                   "'vgrefine' attention implementation (or its forward is compiled)")
            if self.answer_choices is not None:
                if self._allowed is None or self._allowed.shape[-1] != scores.shape[-1]:
                    allowed = torch.full((scores.shape[-1],), float("-inf"))
                    allowed[self.answer_choices] = 0.0
                    self._allowed = allowed.to(scores.device, non_blocking=True)
                scores = scores + self._allowed.to(scores.dtype)
        top = scores.float().softmax(-1).max(-1)
        self._top.append((top.indices, top.values))
        return scores

    @property
    def steps(self) -> list[dict]:
        """Per decoding step: ``step``, ``knockout_active`` (the knockout shaped this step's logits: the
        prefill step always, later steps only with ``knockout_scope="all_steps"``), ``top_token``, ``top_prob``."""
        if not self._top:
            return []
        idx = torch.stack([i for i, _ in self._top]).tolist()      # one read back for all steps
        val = torch.stack([v for _, v in self._top]).tolist()
        return [{"step": i, "knockout_active": bool(self.state.biases) and (i == 0 or self.knockout_scope == "all_steps"),
                 "top_token": idx[i], "top_prob": val[i]} for i in range(len(self._top))]
