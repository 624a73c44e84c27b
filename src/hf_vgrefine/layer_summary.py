"""Where does a model look? Per-layer summary of the last prompt token's attention to the image.

For each decoder layer: the attention mass on the image tokens (sum over the image, mean over heads),
the peak cell of the relative map (question / generic prompt) on the token grid and, for a box, the
attention ratio of the box region (1 = chance). Used by ``hf-vgrefine capture``.
"""

from __future__ import annotations

__all__ = ["capture_summary"]


def capture_summary(model, processor, image, question, box=None, generic=True) -> list[dict]:
    """Per-layer rows: ``layer, image_mass, peak_cell (row, col), attention_ratio`` (AR only with ``box``)."""
    import torch

    from .adapters import get_adapter
    from .attention import capture_image_attention
    from .geometry import boxes_to_token_mask
    from .metrics import attention_ratio, relative_attention
    from .prompts import build_inputs, generic_inputs, to_model_inputs

    adapter = get_adapter(model)
    inputs = to_model_inputs(build_inputs(processor, [image], [question]), model)
    cap = capture_image_attention(model, inputs)
    q = cap.sample(0).mean(1).double()                                   # [L, N]
    rel = q
    if generic:
        g_in = to_model_inputs(generic_inputs(processor, [image]), model)
        g = capture_image_attention(model, g_in).sample(0).mean(1).double()
        rel = torch.as_tensor(relative_attention(q.numpy(), g.numpy()))
    span = cap.spans[0][0]
    region = None
    if box is not None:
        grid = adapter.token_grid(processor, image.size, span=span, inputs=inputs)
        region = boxes_to_token_mask([box], grid)
    rows = []
    for i, layer in enumerate(cap.layers):
        k = int(torch.argmax(rel[i]))
        row = {"layer": layer, "image_mass": float(q[i].sum()), "peak_cell": [k // span.cols, k % span.cols]}
        if region is not None:
            row["attention_ratio"] = float(attention_ratio(rel[i].numpy(), region))
        rows.append(row)
    return rows
