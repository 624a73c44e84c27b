"""The three used-by lines work right after installing (issue 12).

The install's post-install step (``hf-vgrefine setup``, run by ``scripts/install.sh``) runs in a
subprocess with a fresh ``HF_HOME``; then a new interpreter in an empty directory runs
``evaluate.load("grounding_ratio")``, ``load_dataset("vgmed", "atlas")``, ``load_dataset("vgmed")``,
``VGRefineWrapper(model)`` and one ``generate`` (``scripts/check_used_by.py``, also run by ``.ci/run``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _check_module():
    spec = importlib.util.spec_from_file_location("check_used_by", REPO / "scripts" / "check_used_by.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.read_bytes()[:4096]) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock") and "__pycache__" not in p.parts}


def test_install_step_then_three_lines_verbatim_in_fresh_process(tmp_path):
    home = tmp_path / "hf_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_CACHE", "HF_MODULES_CACHE"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cwd = tmp_path / "empty"
    cwd.mkdir()
    setup = [sys.executable, "-m", "hf_vgrefine.cli", "setup", "--quiet"]
    first = subprocess.run(setup, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "" and first.stderr == ""                 # quiet
    assert (home / "datasets" / "vgmed" / "atlas").is_dir()          # honours HF_HOME
    assert list((home / "modules" / "evaluate_modules" / "metrics").glob("evaluate-metric--grounding_ratio/*/grounding_ratio.py"))
    before = _files(home)
    second = subprocess.run(setup, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout == "" and second.stderr == ""
    assert _files(home) == before                                   # idempotent: nothing rebuilt or added
    assert list(cwd.iterdir()) == []

    res = _check_module().run_check(env)
    assert res["vgmed_atlas_rows"] == res["vgmed_default_rows"] > 0
    assert res["default_config_name"] == "atlas"
    assert res["metric"] == "GroundingRatio" and "attention_ratio" in res["metric_keys"]
    assert res["generated_tokens"] == 2
    assert len(res["wrapper_warnings"]) == 1 and "hf_vgrefine.calibrate" in res["wrapper_warnings"][0]
    assert res["cwd_leftovers"] == []


# ------------------------------------------------------------------------------------ VGRefineWrapper(model)
@pytest.mark.parametrize("L,H,masked,layers", [(28, 28, 16, [15, 16]), (4, 4, 2, [1, 2]), (1, 2, 0, [0]),
                                               (2, 3, 1, [0, 1]), (32, 32, 18, [17, 18]), (40, 8, 23, [22, 23])])
def test_depth_default_rule(L, H, masked, layers):
    from hf_vgrefine.vgrefine.defaults import depth_default_config

    # hand-computed: round(L * 16 / 28) clipped to [0, L-1]; all heads of that layer and the one below
    cfg = depth_default_config(L, H)
    assert cfg.masked_layers == [masked]
    assert cfg.sensitive_heads == [[l, h] for l in layers for h in range(H)]
    assert cfg.percentile == 80.0


@pytest.mark.parametrize("name,preset", [
    ("FreedomIntelligence/HuatuoGPT-Vision-7B-hf", "huatuogpt-vision-7b"),
    ("/models/HuatuoGPT-Vision-7B-hf/", "huatuogpt-vision-7b"),
    ("/cache/hub/models--FreedomIntelligence--HuatuoGPT-Vision-7B-hf", "huatuogpt-vision-7b"),
    ("llava-hf/llava-1.5-7b-hf", None), ("", None)])
def test_preset_for_model(name, preset):
    from hf_vgrefine.vgrefine.defaults import preset_for_model

    assert preset_for_model(name) == preset


def test_wrapper_without_config_or_processor(tmp_path):
    from transformers import AutoModelForImageTextToText

    from hf_vgrefine import VGRefineWrapper
    from hf_vgrefine.prompts import build_inputs
    from hf_vgrefine.testing import build_tiny_model, tiny_processor

    tiny = build_tiny_model("llava")
    proc = tiny_processor("llava")
    tiny.model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = VGRefineWrapper(model)
    msgs = [str(c.message) for c in caught if "VGRefineWrapper" in str(c.message)]
    assert len(msgs) == 1 and "hf_vgrefine.calibrate" in msgs[0] and "no preset" in msgs[0]
    L = w.adapter.num_layers
    m = min(L - 1, round(L * 16 / 28))
    assert w.config.masked_layers == [m]
    assert w.processor is not None and w.processor.tokenizer.padding_side == "left"
    assert w.processor.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    from PIL import Image

    img = Image.new("RGB", (40, 30), (120, 60, 30))
    inputs = build_inputs(w.processor, [img], ["Is there a lesion?"])
    out = w.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1
    assert w.last_triage[0].knocked_out.numel() > 0
    # a given config and processor are used as given, with no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w2 = VGRefineWrapper(model, w.config, processor=proc)
    assert w2.processor is proc and not [c for c in caught if "VGRefineWrapper" in str(c.message)]


def test_wrapper_known_checkpoint_gets_its_preset(tmp_path):
    from hf_vgrefine.vgrefine import VGRefineConfig
    from hf_vgrefine.vgrefine.defaults import default_config

    class _Adapter:
        num_layers, num_heads = 28, 28

    class _Model:
        name_or_path = "FreedomIntelligence/HuatuoGPT-Vision-7B-hf"

    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no warning for a known checkpoint
        cfg = default_config(_Model(), _Adapter())
    assert cfg.to_dict() == VGRefineConfig.from_preset("huatuogpt-vision-7b").to_dict()
