"""Bad input gets a clear message naming the problem and the fix, never silence (issue 12).

Every check reads the exact user-facing text; CLI errors are argparse usage errors (exit 2, no traceback).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from hf_vgrefine import cli

from _grounding_fixtures import load_fixture


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------- lazy exports
def test_readme_import_line_gives_a_callable_calibrate_in_any_order():
    code = (
        "import inspect\n"
        "from hf_vgrefine import measure_grounding, calibrate, load_vgmed\n"
        "first = calibrate\n"
        "import hf_vgrefine.calibrate as mod\n"          # binds the package attribute to the module
        "from hf_vgrefine import calibrate\n"
        "for f in (first, calibrate):\n"
        "    assert callable(f) and inspect.signature(f) == inspect.signature(mod.calibrate)\n"
        "assert hasattr(mod, 'RANK_RULES')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_module_calibrate_called_as_function_runs_calibration():
    import hf_vgrefine
    import hf_vgrefine.calibrate as mod

    captured = {}

    def fake(*args, **kwargs):
        captured["args"] = args
        return "cfg"

    real = mod.calibrate
    mod.calibrate = fake
    try:
        assert hf_vgrefine.calibrate("model", "proc", "ds", k=3) == "cfg"
    finally:
        mod.calibrate = real
    assert captured["args"] == ("model", "proc", "ds")


# ----------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("argv,needle", [
    (["demo", "--limit", "-1"], "argument --limit: -1 is not allowed; give an integer >= 1"),
    (["demo", "--k", "0"], "argument --k: 0 is not allowed; give an integer >= 1"),
    (["demo", "--batch-size", "x"], "argument --batch-size: 'x' is not a whole number; give an integer >= 1"),
    (["demo", "--percentile", "180"], "argument --percentile: 180.0 is outside [0, 100]"),
    (["evaluate", "--model", "org/m", "--out", "o", "--limit", "-2"], "argument --limit: -2 is not allowed"),
    (["evaluate", "--model", "org/m", "--out", "o", "--batch-size", "0"], "argument --batch-size: 0 is not allowed"),
    (["measure", "--model", "org/m", "--dataset", "vgmed", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: 0 is not allowed"),
    (["calibrate", "--model", "org/m", "--dataset", "vgmed", "--out", "o", "--k", "0"], "argument --k: 0 is not allowed"),
])
def test_bad_numbers_are_usage_errors(argv, needle, capsys):
    assert needle in _usage_error(argv, capsys)


def test_config_rejects_strings_and_malformed_heads():
    from hf_vgrefine.vgrefine import VGRefineConfig

    base = dict(masked_layers=[1], sensitive_heads=[[0, 1]])
    with pytest.raises(TypeError, match=r"VGRefineConfig.percentile='80' is a str; give a number \(e.g. percentile=80\)"):
        VGRefineConfig(**{**base, "percentile": "80"})
    with pytest.raises(ValueError, match=r"sensitive_heads\[0\]=\[2\] is not a \(layer, head\) pair; give \[layer, head\] "
                                         r"pairs, e.g. sensitive_heads=\[\[16, 5\], \[15, 4\]\]"):
        VGRefineConfig(**{**base, "sensitive_heads": [[2]]})
    with pytest.raises(TypeError, match="masked_layers='16': give a list of layer indices"):
        VGRefineConfig(**{**base, "masked_layers": "16"})
    with pytest.raises(TypeError, match="is not a whole number"):
        VGRefineConfig(**{**base, "sensitive_heads": [[0, 1.5]]})
    with pytest.raises(ValueError, match="give a finite number"):
        VGRefineConfig(**{**base, "eps": float("nan")})
    with pytest.raises(ValueError, match=r"magnitude_threshold must be in \[0, 1\]"):
        VGRefineConfig(**{**base, "percentile": None, "magnitude_threshold": 2})
    with pytest.raises(ValueError, match="attention_dtype='fp16'; choose one of"):
        VGRefineConfig(**{**base, "attention_dtype": "fp16"})
    assert VGRefineConfig(**{**base, "percentile": 80}).percentile == 80.0


# ----------------------------------------------------------------------------------------- misleading errors
@pytest.mark.parametrize("command", [["demo"], ["measure", "--dataset", "vgmed", "--out", "o"],
                                     ["evaluate", "--out", "o"], ["capture"]])
def test_missing_model_folder_says_not_a_folder_and_not_a_hub_id(command, capsys):
    err = _usage_error([*command, "--model", "/nonexistent"], capsys)
    assert ("argument --model: '/nonexistent' is not a local folder and not a hub model id; give an existing folder "
            "holding config.json") in err


def test_load_model_and_processor_missing_folder():
    from hf_vgrefine.measure import load_model_and_processor

    with pytest.raises(ValueError, match="'/nonexistent/model' is not a local folder and not a hub model id"):
        load_model_and_processor("/nonexistent/model")


def test_evaluate_missing_data_dir_is_a_usage_error(capsys):
    err = _usage_error(["evaluate", "--model", "org/m", "--out", "o", "--data-dir", "/nonexistent"], capsys)
    assert "argument --data-dir: '/nonexistent' is not an existing folder" in err


def test_evaluate_vgrefine_without_config(tmp_path, capsys):
    from hf_vgrefine.commands.evaluate import default_vgrefine_config

    err = _usage_error(["evaluate", "--model", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert "--methods includes vgrefine but no --vgrefine-config was given" in err
    assert "run `hf-vgrefine calibrate --model ... --out CAL` first" in err and "--methods baseline" in err
    import argparse

    ns = argparse.Namespace(methods="baseline,vgrefine", vgrefine_config=None,
                            model="FreedomIntelligence/HuatuoGPT-Vision-7B-hf")
    assert default_vgrefine_config(ns, argparse.ArgumentParser()) == "huatuogpt-vision-7b"
    ns.methods, ns.model = "baseline", str(tmp_path)
    assert default_vgrefine_config(ns, argparse.ArgumentParser()) is None


def _corrupt_dataset():
    import datasets

    ds = load_fixture().select(range(4))
    rows = ds.to_list()
    bad = rows[2]["image"]
    bad["bytes"] = bad["bytes"][: len(bad["bytes"]) // 3]                 # truncated image file
    return datasets.Dataset.from_list(rows, features=ds.features)


def test_corrupt_image_names_the_row_and_skip_records_it(tmp_path):
    from hf_vgrefine.measure import measure_grounding
    from hf_vgrefine.testing import build_tiny_model, tiny_processor

    ds = _corrupt_dataset()
    bad_id = ds.select_columns(["id"])[2]["id"]      # ds[2] itself would decode the broken image
    model, proc = build_tiny_model("llava").model, tiny_processor("llava")
    with pytest.raises(ValueError) as e:
        measure_grounding(model, proc, ds, layers=[0], progress=False)
    msg = str(e.value)
    assert msg.startswith(f"row 2 (id {bad_id!r}): its image cannot be read")
    assert "on_error='skip' (CLI: --on-error skip)" in msg
    res = measure_grounding(model, proc, ds, layers=[0], progress=False, on_error="skip", output_dir=str(tmp_path / "m"))
    assert len(res) == 3 and bad_id not in res.ids
    assert [s["id"] for s in res.info["skipped"]] == [bad_id] and res.info["skipped"][0]["index"] == 2
    saved = json.loads((tmp_path / "m" / "skipped.json").read_text())
    assert saved[0]["id"] == bad_id and "cannot be read" in saved[0]["error"]


def test_truncated_datasets_cache_says_how_to_rebuild(tmp_path):
    from hf_vgrefine.data.build import cached_path, load_vgmed, prefill_cache

    prefill_cache("atlas", cache_dir=tmp_path)
    arrow = next(cached_path("atlas", tmp_path).glob("*.arrow"))
    with open(arrow, "r+b") as f:
        f.truncate(4000)
    with pytest.raises(RuntimeError) as e:
        load_vgmed("atlas", cache_dir=tmp_path)
    msg = str(e.value)
    assert "cannot be read" in msg and "damaged" in msg
    assert "Rebuild it with `hf-vgrefine build-vgmed --config atlas`" in msg
    prefill_cache("atlas", cache_dir=tmp_path)                           # the advice works
    assert len(load_vgmed("atlas", cache_dir=tmp_path)) > 0


def test_two_images_in_one_prompt():
    from PIL import Image

    from hf_vgrefine.attention import capture_image_attention
    from hf_vgrefine.testing import build_tiny_model, tiny_processor

    tiny, proc = build_tiny_model("llava"), tiny_processor("llava")
    n = (tiny.model.config.vision_config.image_size // tiny.model.config.vision_config.patch_size) ** 2
    img = Image.new("RGB", (32, 32))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[img, img], text=[text], return_tensors="pt")
    with pytest.raises(ValueError) as e:
        capture_image_attention(tiny.model, inputs)
    assert str(e.value).startswith(f"sample 0: the prompt holds 2 images ({2 * n} image tokens = 2 x {n}); ")
    assert "exactly one image per prompt" in str(e.value)


def test_one_dimensional_map_to_the_metric():
    from hf_vgrefine import load_grounding_metric

    metric = load_grounding_metric()
    with pytest.raises(ValueError) as e:
        metric.compute(predictions=[np.full(16, 1 / 16)], references=[np.ones(16, bool)])
    msg = str(e.value)
    assert msg.startswith("predictions 0 has shape (16,) (1-D); the grounding_ratio metric takes 2-D token grids")
    assert "reshape" in msg and "0.0625" not in msg                      # no array dump


def test_capture_device_and_tiny_model_notice(capsys):
    from hf_vgrefine.commands.capture import TINY_NOTICE

    err = _usage_error(["capture", "--device", "cuda:99"], capsys)
    assert "argument --device: 'cuda:99': no such CUDA device on this machine" in err
    assert "argument --device: 'nodevice' is not a torch device" in _usage_error(["capture", "--device", "nodevice"], capsys)
    assert cli.main(["capture", "--no-generic"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(TINY_NOTICE)
    assert "tiny random-weight LLaVA" in TINY_NOTICE and "Pass --model" in TINY_NOTICE


def test_unusable_generic_cache_dir_warns_once_and_generate_works(tmp_path, caplog):
    from hf_vgrefine import VGRefineConfig, VGRefineWrapper
    from hf_vgrefine.testing import build_tiny_model, tiny_inputs

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    tiny = build_tiny_model("llava")
    cfg = VGRefineConfig(masked_layers=[1], sensitive_heads=[[0, 0], [1, 1]])
    w = VGRefineWrapper(tiny.model, cfg, processor=None, cache_dir=blocker)
    inputs = tiny_inputs(tiny, [5, 7])
    g_inputs = tiny_inputs(tiny, [4, 4])
    with caplog.at_level(logging.WARNING, logger="hf_vgrefine.generic_cache"):
        for _ in range(2):
            out = w.generate(**inputs, generic_inputs=g_inputs, max_new_tokens=1, do_sample=False)
    assert out.shape[0] == 2
    warned = [r for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warned) == 1 and "continuing with the in-memory cache only" in warned[0].getMessage()
    assert blocker.read_text() == "a file"
