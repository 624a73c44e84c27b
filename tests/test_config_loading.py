"""VGRefineConfig: explicit arguments win over faithful=True, unknown keys warn and are ignored, the saved
version is checked (issue 14). Each test failed on main before this change (faithful overrode explicit
arguments, unknown keys raised, the version was never read)."""

from __future__ import annotations

import json
import warnings

import pytest

from hf_vgrefine.vgrefine import VGRefineConfig
from hf_vgrefine.vgrefine.config import CONFIG_NAME

BASE = dict(masked_layers=[1], sensitive_heads=[[0, 0]])


def test_explicit_arguments_win_over_faithful():
    cfg = VGRefineConfig(**BASE, faithful=True, share_prefix=True, min_cells_per_box=1)
    assert cfg.share_prefix is True and cfg.min_cells_per_box == 1          # given: kept
    assert cfg.early_exit is False and cfg.cache_generic is False           # not given: the released value
    assert cfg.huatuo_box_mapping == "stretch" and cfg.attention_dtype == "model"
    plain = VGRefineConfig(**BASE, share_prefix=False)
    assert plain.share_prefix is False and plain.early_exit is True and plain.attention_dtype == "float32"


def test_faithful_round_trip_keeps_explicit_choice(tmp_path):
    cfg = VGRefineConfig(**BASE, faithful=True, share_prefix=True)
    cfg.save_pretrained(tmp_path)
    back = VGRefineConfig.from_pretrained(tmp_path)
    assert back == cfg and back.share_prefix is True and back.early_exit is False


def test_faithful_override_of_a_saved_default_config(tmp_path):
    VGRefineConfig(**BASE).save_pretrained(tmp_path)
    f = VGRefineConfig.from_pretrained(tmp_path, faithful=True)
    assert f.faithful and f.share_prefix is False and f.huatuo_box_mapping == "stretch"
    g = VGRefineConfig.from_pretrained(tmp_path, faithful=True, early_exit=True)
    assert g.early_exit is True and g.share_prefix is False


def test_unknown_keys_warn_and_are_ignored(tmp_path):
    d = VGRefineConfig(**BASE).to_dict()
    d["knob_from_the_future"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d))
    with pytest.warns(UserWarning, match=r"ignoring unknown fields \['knob_from_the_future'\]"):
        cfg = VGRefineConfig.from_pretrained(tmp_path)
    assert cfg.masked_layers == [1] and not hasattr(cfg, "knob_from_the_future")


def test_newer_major_version_warns_same_major_is_silent():
    d = VGRefineConfig(**BASE).to_dict()
    with pytest.warns(UserWarning, match="newer major version"):
        VGRefineConfig.from_dict({**d, "version": "99.0.0"})
    with pytest.warns(UserWarning, match="unreadable version"):
        VGRefineConfig.from_dict({**d, "version": "banana"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VGRefineConfig.from_dict(d)                                            # this version: no warning
        VGRefineConfig.from_dict({**d, "version": "0.0.1"})                    # older, same major: no warning


def test_medvqa_evaluate_is_a_deprecated_alias():
    from hf_vgrefine import medvqa

    with pytest.warns(DeprecationWarning, match="evaluate_medvqa"):
        with pytest.raises(TypeError):
            medvqa.evaluate()                                                   # warns before the call fails
    assert medvqa.evaluate_medvqa.__name__ == "evaluate_medvqa"
