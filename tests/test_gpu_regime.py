"""Where users run VGRefine: compiled/exported models, accelerate-hooked (offloaded) models, no host reads on the
refine path, and CUDA equality with the CPU (skipped, with the reason printed, where no GPU exists).

References are independent of the code under test: the same model on plain SDPA, an un-hooked copy of the
model, and the CPU fp32 run of the same inputs.
"""

import copy
import inspect
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _grounding_fixtures import attention_layers

from hf_vgrefine.adapters import get_adapter
from hf_vgrefine.attention import register_attention
from hf_vgrefine.testing import FAMILIES, build_tiny_model, tiny_inputs
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper

GRIDS = {"llava_next": [(40, 70), (28, 28), (60, 30)], "qwen2_vl": [(4, 4), (2, 3), (3, 5)],
         "qwen2_5_vl": [(4, 4), (2, 3), (3, 5)], "qwen3_vl": [(4, 4), (2, 3), (3, 5)],
         "qwen3_5": [(4, 4), (2, 3), (3, 5)], "qwen3_5_moe": [(4, 4), (2, 3), (3, 5)]}
HEADS = [[0, 1], [1, 2], [2, 3], [1, 0]]
HYBRID_HEADS = [[1, 1], [1, 2], [2, 3], [1, 0]]    # the tiny Qwen 3.5 models: layer 0 is linear attention
SRC = os.path.dirname(inspect.getfile(VGRefineWrapper)).rsplit(os.sep, 1)[0]     # .../src/hf_vgrefine


def _grids(fam, n):
    return GRIDS[fam][:n] if fam in GRIDS else None


def _cfg(model=None, **kw):
    hybrid = model is not None and attention_layers(model) != list(range(model.config.get_text_config().num_hidden_layers))
    base = dict(masked_layers=[1], sensitive_heads=HYBRID_HEADS if hybrid else HEADS, percentile=50.0)
    base.update(kw)
    return VGRefineConfig(**base)


def _generic_like(inputs, model, tail):
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs)
    rows = []
    for b, sp in enumerate(spans):
        start = int(inputs["attention_mask"][b].float().argmax())
        rows.append(torch.cat([inputs["input_ids"][b, start:sp[0].end].cpu(), torch.tensor(tail)]))
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    dev = inputs["input_ids"].device
    out = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out.update(input_ids=ids.to(dev), attention_mask=mask.to(dev), **adapter.id_derived(ids.to(dev), inputs))
    return out


# ------------------------------------------------------------------ compile / export
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_export_strict_and_static_cache(family):
    """A model left on "vgrefine" (no probe active) compiles with fullgraph=True, exports strictly, and greedy
    generate with a static cache gives sdpa's tokens."""
    register_attention()
    tiny = build_tiny_model(family, num_hidden_layers=3)
    model = tiny.model
    ref_model = copy.deepcopy(model)                      # stays on sdpa: the reference
    if family == "paligemma":
        # PaliGemma's text attention has is_causal=False (prefix-LM); transformers' uncompiled sdpa drops an all-ones
        # causal mask and then attends bidirectionally, while compiled / exported graphs keep the causal mask: the
        # eager text attention (always the explicit causal mask) is the reference
        ref_model.set_attn_implementation({"text_config": "eager"})
    model.set_attn_implementation({"text_config": "vgrefine"})
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
        got = compiled(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x, use_cache=False).logits

    ep = torch.export.export(Logits(model), (ids,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), ref, atol=1e-5, rtol=0)
    inputs = tiny_inputs(tiny, [3, 5], _grids(family, 2), seed=2)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        want = ref_model.generate(**inputs, **kw)
        out = model.generate(**inputs, **kw)
    assert torch.equal(out, want)
    # VGRefine on the same model with a static cache: full prefill (no replay), the knockout still applies
    w = VGRefineWrapper(model, _cfg(model, masked_layers=[1]))
    refined = w.generate(**inputs, generic_inputs=_generic_like(inputs, model, [40, 41]), **kw)
    dynamic = w.generate(**inputs, generic_inputs=_generic_like(inputs, model, [40, 41]),
                         **{**kw, "cache_implementation": "dynamic"})
    assert torch.equal(refined, dynamic)


def test_compiled_forward_falls_back_to_eager_with_a_message(caplog):
    tiny = build_tiny_model("llava", num_hidden_layers=3)
    model = tiny.model
    inputs = tiny_inputs(tiny, [3, 5], seed=4)
    generic = _generic_like(inputs, model, [40, 41, 42])
    want = VGRefineWrapper(model, _cfg()).generate(**inputs, generic_inputs=generic, max_new_tokens=3, do_sample=False)
    torch._dynamo.reset()
    model.compile(backend="eager")
    try:
        with caplog.at_level("WARNING"):
            got = VGRefineWrapper(model, _cfg()).generate(**inputs, generic_inputs=generic, max_new_tokens=3,
                                                          do_sample=False)
    finally:
        model._compiled_call_impl = None
    assert torch.equal(got, want)
    assert any("compiled" in r.getMessage() and "eagerly" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ accelerate hooks
@pytest.mark.parametrize("share", [True, False])
def test_offloaded_model_equals_plain_model(share):
    """accelerate's cpu_offload (weights on the meta device, moved in by hooks at every module call) gives the
    same tokens and knockout sets as the plain model, with and without the shared prefix."""
    from accelerate import cpu_offload

    tiny = build_tiny_model("llava", num_hidden_layers=3)
    plain = tiny.model
    hooked = cpu_offload(copy.deepcopy(plain), execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in hooked.parameters())
    assert any(hasattr(m, "_hf_hook") for m in get_adapter(hooked).decoder_layers.modules())
    inputs = tiny_inputs(tiny, [3, 6], seed=9)
    generic = _generic_like(inputs, plain, [40, 41, 42])
    kw = dict(generic_inputs=generic, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    w_plain = VGRefineWrapper(plain, _cfg(masked_layers=[2], share_prefix=False))
    w_hooked = VGRefineWrapper(hooked, _cfg(masked_layers=[2], share_prefix=share))
    want = w_plain.generate(**inputs, **kw)
    got = w_hooked.generate(**inputs, **kw)
    assert torch.equal(got, want)
    for a, b in zip(w_plain.last_triage, w_hooked.last_triage):
        assert torch.equal(a.knocked_out, b.knocked_out)
        torch.testing.assert_close(a.triage_map, b.triage_map, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_runs_the_vision_encoder_once(family):
    """With the shared prefix the answer's prefill reuses the triage pass's vision-encoder output: the encoder
    runs once per 1-token generate (twice without sharing), the tokens equal the unshared run's, and the
    model's encoder module is the original one afterwards."""
    tiny = build_tiny_model(family, num_hidden_layers=3)
    model = tiny.model
    parent, name = get_adapter(model).vision_encoder()
    encoder = getattr(parent, name)
    calls = []
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    inputs = tiny_inputs(tiny, [3, 6], seed=4, grids=_grids(family, 2))
    kw = dict(generic_inputs=_generic_like(inputs, model, [40, 41, 42]), max_new_tokens=1, do_sample=False)
    try:
        counts, outs = {}, {}
        for share in (True, False):
            calls.clear()
            outs[share] = VGRefineWrapper(model, _cfg(model, masked_layers=[2], share_prefix=share)).generate(**inputs,
                                                                                                               **kw)
            counts[share] = len(calls)
    finally:
        handle.remove()
    # prefix-LM (PaliGemma): the image keys depend on the text, so the generic prompt runs its own pass (not packed);
    # hybrid (Qwen 3.5: linear-attention layers, from the config's layer_types): no sharing at all, the plain path
    hybrid = len(attention_layers(model)) < model.config.get_text_config().num_hidden_layers
    shared = 3 if hybrid else 2 if get_adapter(model).prefix_lm else 1
    assert counts == {True: shared, False: 3}      # unshared: question pass, generic pass, answer
    assert torch.equal(outs[True], outs[False])
    assert getattr(parent, name) is encoder


# ------------------------------------------------------------------ host reads
_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "item", "unique",
             "_unique2", "repeat_interleave"}
_READ_METHODS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__")


def _our_caller():
    """``(function, line)`` of the innermost Python frame if it lies in the package (else ``None``)."""
    f = inspect.currentframe().f_back
    while f is not None and (f.f_code.co_filename == __file__ or "torch" + os.sep in f.f_code.co_filename
                             and SRC not in f.f_code.co_filename):
        f = f.f_back
    if f is not None and f.f_code.co_filename.startswith(SRC):
        return f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{f.f_lineno}"
    return None


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (a synchronisation on an accelerator),
    with the package frame that issued it, and markers in the same timeline."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _READ_OPS and not (name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], int)):
            who = _our_caller()
            if who is not None:
                self.events.append(("read", name, who))
        return func(*args, **(kwargs or {}))


def test_refine_path_reads_nothing_back_between_triage_and_first_token(monkeypatch):
    """From the first decoder-layer call of the triage to the logits of the answer's first token, no package
    code reads a tensor value back to the host (no .item()/.tolist()/.cpu()/nonzero()/bool(tensor)...)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    tiny = build_tiny_model("qwen2_vl", num_hidden_layers=3)
    model = tiny.model
    inputs = tiny_inputs(tiny, [3, 6], _grids("qwen2_vl", 2), seed=3)
    generic = _generic_like(inputs, model, [40, 41, 42])
    mode = _HostReads()
    for meth in _READ_METHODS:
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, _m=meth, **k):
            who = _our_caller()
            if who is not None:
                mode.events.append(("read", _m, who))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, spy)

    class Marker(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mode.events.append(("mark", "first_token_logits", None))
            return scores

    layer0 = get_adapter(model).decoder_layers[0]
    hook = layer0.register_forward_pre_hook(lambda *a: mode.events.append(("mark", "decoder_call", None)))
    try:
        for share in (True, False):
            mode.events.clear()
            w = VGRefineWrapper(model, _cfg(masked_layers=[2], share_prefix=share))
            with mode:
                w.generate(**inputs, generic_inputs=generic, max_new_tokens=2, do_sample=False,
                           logits_processor=LogitsProcessorList([Marker()]))
            marks = [i for i, e in enumerate(mode.events) if e[0] == "mark"]
            first = next(i for i in marks if mode.events[i][1] == "decoder_call")
            last = next(i for i in marks if mode.events[i][1] == "first_token_logits")
            window = [e for e in mode.events[first:last] if e[0] == "read"]
            assert window == [], f"share_prefix={share}: host reads on the refine path: {window}"
            assert any(e[0] == "read" for e in mode.events[:first]), "the layout read should be seen (detector works)"
    finally:
        hook.remove()


class _OnDevice(torch.Tensor):
    """A tensor that behaves as if it lived on an accelerator: ``.cpu()`` returns a separate host copy."""

    def cpu(self, *a, **k):
        return self.as_subclass(torch.Tensor).clone()


def test_image_sizes_are_read_back_once_per_prompt(monkeypatch):
    """The caller's ``image_grid_thw`` is read back to the host only by ``.cpu()`` copies (the layout reads, the
    generic prompt's size check) and nothing computed from it on the device is read back; splitting Qwen's flattened patches per image for the cache fingerprints and
    the same-image check uses those host copies (on a GPU each extra read is a sync)."""
    tiny = build_tiny_model("qwen2_vl", num_hidden_layers=3)
    inputs = tiny_inputs(tiny, [3, 6], _grids("qwen2_vl", 2), seed=4)
    generic = _generic_like(inputs, tiny.model, [40, 41, 42])
    q_thw, g_thw = inputs["image_grid_thw"].as_subclass(_OnDevice), inputs["image_grid_thw"].as_subclass(_OnDevice)
    inputs["image_grid_thw"], generic["image_grid_thw"] = q_thw, g_thw
    reads = []
    for meth in _READ_METHODS:
        orig = getattr(torch.Tensor, meth) if meth != "cpu" else _OnDevice.cpu

        def spy(self, *a, _orig=orig, _m=meth, **k):
            if isinstance(self, _OnDevice) and _our_caller() is not None and _m != "numpy":
                reads.append(("question" if self is q_thw else "generic" if self is g_thw else "derived", _m,
                              _our_caller()))
            return _orig(self, *a, **k)
        monkeypatch.setattr(_OnDevice if meth == "cpu" else torch.Tensor, meth, spy)
    w = VGRefineWrapper(tiny.model, _cfg(masked_layers=[2]))
    w.refine_inputs(**inputs, generic_inputs=generic)
    assert [r[1] for r in reads if r[0] == "question"] == ["cpu"], reads
    assert {r[1] for r in reads if r[0] == "generic"} == {"cpu"}, reads
    assert [r for r in reads if r[0] == "derived"] == [], reads     # no value read of a device-side result


# ------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device on this machine: the CUDA equality and sync checks need one")


def _to(inputs, dev):
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}


@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_equals_cpu_and_has_no_syncs_on_the_refine_path(family):
    from hf_vgrefine import capture_image_attention

    tiny = build_tiny_model(family, num_hidden_layers=3)
    cpu_model = tiny.model
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    inputs = tiny_inputs(tiny, [3, 6, 4], _grids(family, 3), seed=21)
    generic = _generic_like(inputs, cpu_model, [40, 41, 42])
    cap_cpu = capture_image_attention(cpu_model, inputs)
    cap_gpu = capture_image_attention(gpu_model, _to(inputs, "cuda"))
    assert cap_gpu.maps.device.type == "cuda"
    torch.testing.assert_close(cap_gpu.maps.cpu(), cap_cpu.maps, atol=1e-5, rtol=0, equal_nan=True)
    gts = [torch.arange(s[0].n_tokens) % 3 == 0 for s in get_adapter(cpu_model).image_spans(inputs)]
    runs = [dict(do_sample=False), dict(do_sample=False, num_beams=2), dict(do_sample=True, top_k=20)]
    for kw in runs:
        for cfg in (_cfg(cpu_model, masked_layers=[2]), _cfg(cpu_model, masked_layers=[2], knockout_set="oracle")):
            extra = {"gt_token_masks": gts} if cfg.knockout_set == "oracle" else {"generic_inputs": generic}
            extra_gpu = {"gt_token_masks": gts} if cfg.knockout_set == "oracle" else \
                {"generic_inputs": _to(generic, "cuda")}
            kwargs = dict(max_new_tokens=3, min_new_tokens=3, output_logits=True, return_dict_in_generate=True, **kw)
            w_cpu, w_gpu = VGRefineWrapper(cpu_model, cfg), VGRefineWrapper(gpu_model, cfg)
            torch.manual_seed(0)
            a = w_cpu.generate(**inputs, **extra, **kwargs)
            torch.manual_seed(0)
            torch.cuda.manual_seed(0)
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    b = w_gpu.generate(**_to(inputs, "cuda"), **extra_gpu, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            ours = [r for r in rec if "synchroniz" in str(r.message) and r.filename.startswith(SRC)
                    and not r.filename.endswith("grounding_pass.py")]
            assert ours == [], [(r.filename, r.lineno) for r in ours]
            if not kw.get("do_sample"):
                assert torch.equal(b.sequences.cpu(), a.sequences)
                torch.testing.assert_close(b.logits[0].cpu(), a.logits[0], atol=1e-4, rtol=0)
            for x, y in zip(w_cpu.last_triage, w_gpu.last_triage):
                assert torch.equal(x.knocked_out, y.knocked_out.cpu())
