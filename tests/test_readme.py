"""The README's Python code blocks run as written (offline, on the shipped reference VLM).

All ```python blocks are executed in order in one namespace, in an empty working directory, after the
install's post-install step (``hf-vgrefine setup``). The only change to the text: the example hub id
``FreedomIntelligence/HuatuoGPT-Vision-7B-hf`` (a 7B download) is replaced by the folder of the reference
VLM shipped in the package, which is a supported LLaVA model too; so the wrapper takes its depth default.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = '"FreedomIntelligence/HuatuoGPT-Vision-7B-hf"'


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    from hf_vgrefine.demo import reference_model_dir
    from hf_vgrefine.setup_cmd import setup

    setup(quiet=True)                                             # what scripts/install.sh runs after pip
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    assert sum(b.count(HUB_ID) for b in blocks) == 1              # the one substitution below
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        code = block.replace(HUB_ID, repr(str(reference_model_dir())))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
        if "VGRefineWrapper(model)" in block:
            msgs = [str(w.message) for w in caught if "VGRefineWrapper" in str(w.message)]
            assert len(msgs) == 1 and "hf_vgrefine.calibrate" in msgs[0]
    # what the blocks promise
    assert ns["inputs"]["input_ids"].shape[1] < ns["out"].shape[1] <= ns["inputs"]["input_ids"].shape[1] + 8
    assert (tmp_path / "triage.png").stat().st_size > 1000
    assert ns["triage"].keep_mask.numel() == ns["triage"].grid[0] * ns["triage"].grid[1]
    assert ns["cap"].maps.dtype.is_floating_point and ns["region"].dtype == bool
    assert set(ns["scores"]) >= {"attention_ratio", "js_divergence"}
    assert len(ns["res"]) > 0 and (tmp_path / "layers.png").is_file()
    assert type(ns["config"]).__name__ == "VGRefineConfig" and ns["config"].masked_layers
    assert (tmp_path / "runs" / "calib" / "vgrefine_config.json").is_file()
