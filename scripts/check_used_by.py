"""Check the package's three used-by lines, verbatim, in a fresh Python process in an empty directory.

Run after ``scripts/install.sh`` (``.ci/run`` does): offline (``HF_HUB_OFFLINE=1``), with the user's
``HF_HOME``, in a new empty working directory, a new interpreter runs

    evaluate.load("grounding_ratio")
    load_dataset("vgmed", "atlas") / load_dataset("vgmed")
    VGRefineWrapper(model)               # no config, no processor

and one ``generate`` through the wrapper on the shipped reference VLM. Prints one JSON line; exit 0 = ok.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SNIPPET = r'''
import json, warnings
import numpy as np

import evaluate
from datasets import load_dataset
from transformers import AutoModelForImageTextToText
from hf_vgrefine import VGRefineWrapper
from hf_vgrefine.demo import reference_model_dir
from hf_vgrefine.prompts import build_inputs

metric = evaluate.load("grounding_ratio")
ds = load_dataset("vgmed", "atlas")
ds_default = load_dataset("vgmed")
model = AutoModelForImageTextToText.from_pretrained(reference_model_dir())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    refined = VGRefineWrapper(model)

row = ds["test"][0]
inputs = build_inputs(refined.processor, [row["image"]], [row["question"]])
out = refined.generate(**inputs, max_new_tokens=2, do_sample=False)
attn = np.random.default_rng(0).random((4, 4)); region = np.zeros((4, 4), bool); region[1:3, 1:3] = True
score = metric.compute(predictions=[attn], references=[region])
print(json.dumps({
    "vgmed_atlas_rows": len(ds["test"]), "vgmed_default_rows": len(ds_default["test"]),
    "default_config_name": ds_default["test"].config_name,
    "metric": type(metric).__name__, "metric_keys": sorted(score),
    "generated_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
    "knocked_out": int(refined.last_triage[0].knocked_out.numel()),
    "wrapper_warnings": [str(w.message) for w in caught if "VGRefineWrapper" in str(w.message)],
}))
'''


def run_check(env: dict | None = None, timeout: float = 600) -> dict:
    """Run :data:`SNIPPET` in a new interpreter in a new empty directory; return its JSON result."""
    import json

    env = dict(os.environ if env is None else env)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="hf_vgrefine_used_by_") as cwd:
        proc = subprocess.run([sys.executable, "-c", SNIPPET], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        leftovers = os.listdir(cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"the used-by lines failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cwd_leftovers"] = leftovers
    return result


if __name__ == "__main__":
    import json

    res = run_check()
    print(json.dumps(res))
    ok = res["vgmed_atlas_rows"] > 0 and res["generated_tokens"] >= 1 and len(res["wrapper_warnings"]) == 1
    sys.exit(0 if ok else 1)
