"""Model passes of the knockout search: a batch's prefix (up to the image end) computed once, then one short
forward of the text after the image per candidate knockout, on that cached prefix; last-position logits.

A unit is the rows of a batch whose image ends at the same position (their prefixes have the same length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["PrefixUnit", "answer_ids", "knockout_logits", "normalise_answer", "prefix_units", "rows_inputs"]


def answer_ids(processor, choices: Sequence[str]) -> list[int]:
    """First token id of each answer choice (they must differ: a question is scored by these logits)."""
    tok = getattr(processor, "tokenizer", processor)
    ids = []
    for c in choices:
        enc = tok(str(c), add_special_tokens=False)["input_ids"]
        if not enc:
            raise ValueError(f"the tokenizer cannot encode the answer choice {c!r}")
        ids.append(int(enc[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer choices {list(choices)} do not start with distinct tokens; the search scores a closed "
                         "question by the first-token logits of its choices")
    return ids


def normalise_answer(s) -> str:
    """Answer text compared case- and space-insensitively."""
    return str(s).strip().lower()


@dataclass
class PrefixUnit:
    """Rows of a batch whose image ends at the same position, with their shared prefix cache."""

    rows: list              # indices into the batch
    start: int              # first position run per candidate (= image end of every row)
    kv: list                # [(k, v)] per layer, positions < start
    tail: dict              # model inputs of the tail
    spans: list             # per row: the image span (absolute positions)
    T: int


def prefix_units(model, adapter, inputs: dict, spans: list, cache: bool = True) -> list[PrefixUnit]:
    """Split a batch into units of rows with the same image end and compute each unit's prefix cache (``cache=False``:
    no prefix pass, ``kv=None``; the candidates then run full forwards)."""
    import torch

    ends = [int(sp[0].end) for sp in spans]
    T = inputs["input_ids"].shape[1]
    explicit = adapter.explicit_position_ids
    pos = adapter.position_ids(inputs) if not explicit else None
    units = []
    for s in sorted(set(ends)):
        rows = [b for b, e in enumerate(ends) if e == s]
        sub = {"input_ids": inputs["input_ids"][rows, :s]}
        mask = inputs.get("attention_mask")
        if mask is not None:
            sub["attention_mask"] = mask[rows, :s]
        sub.update(adapter.select_images(inputs, rows))
        sub.update(adapter.id_derived(sub["input_ids"], inputs))
        if pos is not None:
            sub["position_ids"] = pos[..., rows, :s]
        kv = None
        if cache:
            with torch.no_grad():
                out = model(**sub, use_cache=True, logits_to_keep=1)
            past = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            kv = [(layer.keys, layer.values) for layer in past.layers]
        tail = {"input_ids": inputs["input_ids"][rows, s:]}
        if mask is not None:
            tail["attention_mask"] = mask[rows]
        tail.update(adapter.id_derived(tail["input_ids"], inputs))
        if pos is not None:
            tail["position_ids"] = pos[..., rows, s:]
        units.append(PrefixUnit(rows=rows, start=s, kv=kv, tail=tail, spans=[spans[b][0] for b in rows], T=T))
    return units


def knockout_logits(model, adapter, unit: PrefixUnit, knocked_out, masked_layers, heads=None, full_inputs=None):
    """Last-position logits ``[B_unit, V]`` with a knockout: for each row ``b`` of the unit, the rows after its
    image do not attend to the image tokens ``knocked_out[b]`` (bool ``[N]``) in ``masked_layers`` (all heads,
    or ``heads[layer]`` = tuple of query heads). This is the only place the package's attention machinery
    applies a candidate (as :meth:`VGRefineWrapper.__call__` does). ``full_inputs``: run the whole prompt
    instead of the unit's tail on its cached prefix (self-check and fallback)."""
    import torch
    from transformers import DynamicCache

    from .attention import AttentionProbe, KeyBias

    biases = []
    for i, span in enumerate(unit.spans):
        if knocked_out is None:
            break
        cols = span.positions[torch.as_tensor(knocked_out[i]).nonzero().flatten().to(span.positions.device)]
        if heads is None:
            biases.append(KeyBias(layers=tuple(masked_layers), batch_index=i, row_start=span.end, row_stop=unit.T,
                                  cols=cols))
        else:
            for l in masked_layers:
                hs = tuple(heads.get(l, ()))
                if hs:
                    biases.append(KeyBias(layers=(l,), batch_index=i, row_start=span.end, row_stop=unit.T, cols=cols,
                                          heads=hs))
    probe = AttentionProbe(model, biases=biases, batch_size=len(unit.rows), adapter=adapter)
    with torch.no_grad(), probe:
        if full_inputs is not None:
            return model(**full_inputs, logits_to_keep=1).logits[:, -1].float()
        cache = DynamicCache()
        for layer, (k, v) in enumerate(unit.kv):
            cache.update(k, v, layer)
        kw = {_cache_kwarg(model): cache}
        return model(**unit.tail, **kw, use_cache=True, logits_to_keep=1).logits[:, -1].float()


def _cache_kwarg(model) -> str:
    """Name of the forward's cache argument (``cache`` or ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def rows_inputs(adapter, inputs: dict, rows: list) -> dict:
    """Model inputs of the batch ``rows`` (the full prompt; the self-check and the fallback run it)."""
    out = {"input_ids": inputs["input_ids"][rows]}
    if "attention_mask" in inputs:
        out["attention_mask"] = inputs["attention_mask"][rows]
    out.update(adapter.select_images(inputs, rows))
    out.update(adapter.id_derived(out["input_ids"], inputs))
    return out
