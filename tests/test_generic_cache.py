"""Generic-prompt map cache: LRU order, exact on-disk round trip, model fingerprints, and VGRefine reading
maps written by an earlier wrapper (another process in real use) without a generic pass."""

import logging

import numpy as np
import pytest
import torch

from hf_vgrefine.generic_cache import GenericMapCache, model_fingerprint
from hf_vgrefine.testing import build_tiny_model, tiny_inputs
from hf_vgrefine.vgrefine import VGRefineConfig, VGRefineWrapper


def test_lru_order_and_counters():
    c = GenericMapCache(2)
    c.put("a", np.zeros(2))
    c.put("b", np.ones(2))
    assert c.get("a") is not None          # a is now the most recent
    c.put("c", np.full(2, 2.0))            # evicts b
    assert "b" not in c and c.get("b") is None and c.get("c") is not None
    assert (c.hits, c.misses, len(c)) == (2, 1, 2)
    with pytest.raises(ValueError, match="max_items"):
        GenericMapCache(-1)
    off = GenericMapCache(0)
    off.put("a", np.zeros(2))
    assert len(off) == 0 and off.get("a") is None


def test_disk_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((3, 4, 7)).astype(np.float32)
    ten = torch.from_numpy(rng.random((2, 5)).astype(np.float32))
    c = GenericMapCache(4, directory=tmp_path, namespace="m1")
    c.put(("img", "last", (0, 1), "p"), arr)
    c.put(("img2", "last", (0, 1), "p"), ten)
    fresh = GenericMapCache(4, directory=tmp_path, namespace="m1")
    got = fresh.get(("img", "last", (0, 1), "p"))
    assert isinstance(got, np.ndarray) and np.array_equal(got, arr)
    got_t = fresh.get(("img2", "last", (0, 1), "p"))
    assert torch.is_tensor(got_t) and torch.equal(got_t, ten)
    assert fresh.disk_hits == 2
    assert GenericMapCache(4, directory=tmp_path, namespace="m2").get(("img", "last", (0, 1), "p")) is None
    assert sorted(p.name for p in (tmp_path / "m1").iterdir() if p.name.startswith(".")) == []   # no temp files


def test_fingerprint_follows_weights_and_dtype(tmp_path):
    tiny = build_tiny_model("llava", num_hidden_layers=2)
    fp = model_fingerprint(tiny.model)
    tiny.model.save_pretrained(tmp_path / "m")
    reloaded = type(tiny.model).from_pretrained(tmp_path / "m")
    assert model_fingerprint(reloaded) == fp
    with torch.no_grad():
        reloaded.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(reloaded) != fp
    assert model_fingerprint(type(tiny.model).from_pretrained(tmp_path / "m", dtype=torch.bfloat16)) != fp
    with torch.device("meta"):                       # offloaded weights: no data to sample, still a fingerprint
        meta = type(tiny.model)._from_config(tiny.model.config)
    assert len(model_fingerprint(meta)) == 40


def _cfg():
    return VGRefineConfig(masked_layers=[1], sensitive_heads=[[0, 1], [1, 2], [2, 0]], percentile=50.0)


def test_wrapper_reads_maps_written_by_an_earlier_wrapper(tmp_path, caplog):
    tiny = build_tiny_model("qwen2_vl", num_hidden_layers=3)
    inputs = tiny_inputs(tiny, [3, 5], [(4, 4), (2, 3)], seed=2)
    generic = tiny_inputs(tiny, [4, 4], [(4, 4), (2, 3)], seed=2)
    first = VGRefineWrapper(tiny.model, _cfg(), cache_dir=tmp_path)
    a = first.refine_inputs(generic_inputs=generic, **inputs)
    assert a.generic_cache_hits == 0
    files = sorted((tmp_path).rglob("*.safetensors"))
    assert len(files) == 2

    calls = []
    second = VGRefineWrapper(tiny.model, _cfg(), cache_dir=tmp_path)
    hook = second.adapter.decoder_layers[0].register_forward_hook(lambda *x: calls.append(x[1][0].shape[1]))
    try:
        b = second.refine_inputs(generic_inputs=generic, **inputs)
    finally:
        hook.remove()
    assert b.generic_cache_hits == 2 and second._cache.disk_hits == 2
    assert calls == [inputs["input_ids"].shape[1]]          # only the question pass ran
    for x, y in zip(a.samples, b.samples):
        assert torch.equal(x.triage_map, y.triage_map) and torch.equal(x.knocked_out, y.knocked_out)

    # other weights, same architecture: nothing is read back
    other = build_tiny_model("qwen2_vl", num_hidden_layers=3, seed=1)
    assert VGRefineWrapper(other.model, _cfg(), cache_dir=tmp_path).refine_inputs(
        generic_inputs=generic, **inputs).generic_cache_hits == 0

    # a damaged file is reported and recomputed, never trusted
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="hf_vgrefine.generic_cache"):
        c = VGRefineWrapper(tiny.model, _cfg(), cache_dir=tmp_path).refine_inputs(generic_inputs=generic, **inputs)
    assert c.generic_cache_hits == 1 and "unreadable" in caplog.text
    for x, y in zip(a.samples, c.samples):
        assert torch.equal(x.triage_map, y.triage_map)
