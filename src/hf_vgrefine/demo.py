"""``hf-vgrefine demo``: the offline end-to-end run on the embedded default, with a report.

One command shows the whole pipeline on real medical images without a GPU or the hub:

1. **Data** — builds (first time) / loads VGMED ``atlas`` (Colin27 T1 slices + AAL masks) and derives the
   reference grounding task of :mod:`hf_vgrefine.reference_task`: "Is there an abnormality in the
   {structure}?" with small hypointense lesions, one ``yes`` and one ``no`` example per target.
   VGMED's ``split_group`` decides the use: ``calibration`` slices (2) calibrate, ``test`` slices (8) are
   measured and answered.
2. **Grounding per layer** — :func:`hf_vgrefine.measure.measure_grounding` on the test examples: last-token
   attention to the image tokens, relative to the generic prompt, scored against the **named** structure's
   box (attention ratio, chance = 1; also raw maps, KL/JS, energy pointing game).
3. **Calibration** — :func:`hf_vgrefine.calibrate.calibrate` on the calibration examples: masked layer
   and top-``k`` sensitive heads.
4. **Baseline vs VGRefine** — yes/no accuracy on the test examples (the answer is the larger of the
   "yes"/"no" logits at the last prompt position), plain forward vs
   :class:`~hf_vgrefine.vgrefine.VGRefineWrapper` with the calibrated config; plus the last-token
   attention at the masked layer before and after the knockout.
5. **Report** — ``report.md`` (and ``report.html``) with PNG figures (per-layer grounding curve with chance
   level, calibration heat-map, overlays with ground-truth contours before/after VGRefine) and the
   accuracy/grounding table; every number comes from ``results.json`` written by the same run.

Default model: the package's reference VLM (``hf_vgrefine/resources/reference_vlm``, a tiny
``LlavaForConditionalGeneration`` trained by ``examples/train_reference_vlm.py``); ``--model`` takes any
hub id or local folder that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .demo_report import (FIGURES, LAYER_HEADER, REPORT_HTML, REPORT_MD, RESULTS_JSON, TABLE_HEADER, TABLE_METHODS,
                          render_html, render_markdown, summary_lines)

__all__ = ["run_demo", "reference_model_dir", "REPORT_MD", "REPORT_HTML", "RESULTS_JSON", "FIGURES", "TABLE_METHODS",
           "TABLE_HEADER", "LAYER_HEADER"]

SCORES = ("attention_ratio", "energy_pointing_game", "kl_gt_attention", "js_divergence", "pointing_game")


def reference_model_dir() -> Path:
    """Folder of the shipped reference VLM (``save_pretrained`` output of model + processor)."""
    from importlib.resources import files

    return Path(str(files("hf_vgrefine").joinpath("resources", "reference_vlm")))


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def _say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _r(x, nd: int = 4):
    """Round for the report (the JSON keeps the same rounded value, so report and JSON agree exactly)."""
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


# ============================================================================================ evaluation
def _answer_token_ids(processor) -> tuple[int, int]:
    tok = getattr(processor, "tokenizer", processor)
    ids = []
    for word in ("yes", "no"):
        enc = tok(word, add_special_tokens=False)["input_ids"]
        if not enc:
            raise ValueError(f"the tokenizer cannot encode {word!r}")
        ids.append(int(enc[0]))
    return ids[0], ids[1]


def _gt_token_mask(adapter, processor, example, config=None):
    """Ground-truth token mask of the example's boxes by the config's box rule (``faithful=True``: the released
    stretch mapping and inclusive-max mask boxes; default: the processor's real geometry)."""
    from .geometry import MASK_DERIVED_SOURCES, study_geometry, study_token_mask

    grid = adapter.token_grid(processor, example["image"].size)
    geo = study_geometry(config) if config is not None else {}
    return grid, study_token_mask(example["boxes"], grid, example["image"].size, mode="any", on_empty="empty",
                                  from_mask=str(example.get("source", "")) in MASK_DERIVED_SOURCES, **geo)


def _transposed(gt: np.ndarray, grid_rc) -> np.ndarray:
    """The token mask with rows and columns swapped (square grids; an all-False mask otherwise -> NaN AR)."""
    rows, cols = grid_rc
    if rows != cols or gt.size != rows * cols:
        return np.zeros_like(gt)
    from einops import rearrange

    return rearrange(gt, "(r c) -> (c r)", r=rows, c=cols).copy()


def _layer_mean(cap, b: int) -> np.ndarray:
    return cap.sample(b).mean(1).detach().float().cpu().numpy()   # [n_layers, N]


def _batches(model, processor, examples, batch_size: int, instruction):
    """``(start index, examples, model inputs)`` of consecutive batches of ``batch_size`` question prompts."""
    from .prompts import build_inputs, to_model_inputs

    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        yield start, batch, to_model_inputs(build_inputs(processor, [e["image"] for e in batch], [e["question"] for e in batch],
                                                  instruction=instruction), model)


def evaluate_refinement(model, processor, examples, config, batch_size: int = 16, progress: bool = True,
                        keep_maps_for: Sequence[int] = ()) -> dict:
    """Baseline vs VGRefine on ``examples`` (yes/no): per-example predictions, and the last-token
    attention at the masked layer(s) before/after the knockout scored against the named region.

    Returns a dict with ``per_example`` (list of dicts) and ``maps`` (for the indices in
    ``keep_maps_for``: before/after relative maps, triage map and keep mask at the first masked layer).
    """
    import torch

    from .adapters import get_adapter
    from .attention import capture_image_attention
    from .metrics import attention_ratio, energy_pointing_game
    from .prompts import generic_inputs, to_model_inputs
    from .vgrefine import VGRefineWrapper

    adapter = get_adapter(model)
    yes, no = _answer_token_ids(processor)
    wrapper = VGRefineWrapper(model, config, processor=processor)
    # upper bound of the knockout: keep exactly the named region's tokens (needs the ground truth)
    oracle = VGRefineWrapper(model, type(config)(**{**config.to_dict(), "knockout_set": "oracle"}))
    layer = int(config.masked_layers[0])
    keep = set(int(i) for i in keep_maps_for)
    rows, maps = [], {}
    bar = _bar(len(examples), "baseline vs VGRefine", progress)
    try:
        for start, batch, inputs in _batches(model, processor, examples, batch_size, config.instruction):
            gt_pairs = [_gt_token_mask(adapter, processor, e, config) for e in batch]
            gts = [g for _, g in gt_pairs]
            grids_rc = [(gr.rows, gr.cols) for gr, _ in gt_pairs]
            with torch.no_grad():
                base = model(**inputs, logits_to_keep=1).logits[:, -1].float()
                refined = wrapper(**inputs).logits[:, -1].float()
                triage = wrapper.last_triage
                best = oracle(**inputs, gt_token_masks=[torch.from_numpy(g) for g in gts]).logits[:, -1].float()
                spans = adapter.image_spans(inputs)
                before = capture_image_attention(model, inputs, layers=[layer], query=config.query, spans=spans,
                                                 adapter=adapter)
                after = capture_image_attention(model, inputs, layers=[layer], query=config.query, spans=spans,
                                                adapter=adapter, biases=triage.biases)
                after_oracle = capture_image_attention(model, inputs, layers=[layer], query=config.query, spans=spans,
                                                       adapter=adapter, biases=oracle.last_triage.biases)
                want = [i for i in range(len(batch)) if start + i in keep]
                gen = None
                if want:
                    g_in = to_model_inputs(generic_inputs(processor, [batch[i]["image"] for i in want],
                                                          instruction=config.instruction), model)
                    gen = capture_image_attention(model, g_in, layers=[layer], query=config.query, adapter=adapter)
            for i, e in enumerate(batch):
                gt = gts[i]
                a0 = _layer_mean(before, i)[0]
                a1 = _layer_mean(after, i)[0]
                a2 = _layer_mean(after_oracle, i)[0]
                o_yes, o_no = float(best[i, yes]), float(best[i, no])
                tri = triage[i]
                keep_mask = tri.keep_mask.cpu().numpy()
                b_yes, b_no = float(base[i, yes]), float(base[i, no])
                r_yes, r_no = float(refined[i, yes]), float(refined[i, no])
                row = {
                    "id": e["id"], "label": e["label"], "answer": e["answer"], "n_lesions": int(e.get("n_lesions", 0)),
                    "baseline": "yes" if b_yes > b_no else "no", "vgrefine": "yes" if r_yes > r_no else "no",
                    "baseline_margin": b_yes - b_no, "vgrefine_margin": r_yes - r_no,
                    "baseline_top1_is_yes_no": int(base[i].argmax()) in (yes, no),
                    "vgrefine_top1_is_yes_no": int(refined[i].argmax()) in (yes, no),
                    "f": float(gt.mean()) if gt.size else float("nan"),
                    "ar_before": float(attention_ratio(a0, gt)), "ar_after": float(attention_ratio(a1, gt)),
                    "mass_before": float(energy_pointing_game(a0, gt)), "mass_after": float(energy_pointing_game(a1, gt)),
                    "image_mass_before": float(np.nansum(a0)), "image_mass_after": float(np.nansum(a1)),
                    "kept_in_region": float(keep_mask[gt].mean()) if gt.any() else float("nan"),
                    "kept_fraction": float(keep_mask.mean()),
                    "triage_ar": float(attention_ratio(tri.triage_map.cpu().numpy().astype(np.float64), gt)),
                    # control: the same maps scored against the ground-truth token mask transposed (rows <-> cols)
                    "ar_before_transposed": float(attention_ratio(a0, _transposed(gt, grids_rc[i]))),
                    "triage_ar_transposed": float(attention_ratio(tri.triage_map.cpu().numpy().astype(np.float64),
                                                                  _transposed(gt, grids_rc[i]))),
                    "oracle": "yes" if o_yes > o_no else "no", "oracle_margin": o_yes - o_no,
                    "ar_oracle": float(attention_ratio(a2, gt)), "mass_oracle": float(energy_pointing_game(a2, gt)),
                    "oracle_kept_fraction": float(oracle.last_triage[i].keep_mask.float().mean()),
                }
                rows.append(row)
                if i in want:
                    gm = _layer_mean(gen, want.index(i))[0]
                    eps = float(config.eps)
                    maps[start + i] = {"before": a0 / (gm + eps), "after": a1 / (gm + eps),
                                       "triage": tri.triage_map.cpu().numpy(), "keep": keep_mask}
            bar.update(len(batch))
    finally:
        bar.close()
    return {"per_example": rows, "maps": maps, "layer": layer}


def _accuracy_block(rows, key: str) -> dict:
    ans = np.array([r["answer"] for r in rows])
    pred = np.array([r[key] for r in rows])
    out = {"accuracy": float((ans == pred).mean()) if len(rows) else float("nan"), "n": len(rows)}
    for c in ("yes", "no"):
        m = ans == c
        out[f"recall_{c}"] = float((pred[m] == c).mean()) if m.any() else float("nan")
    return out


def _mean(rows, key):
    v = np.array([r[key] for r in rows], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _bootstrap_diff(rows, n_boot: int = 1000, seed: int = 0, key: str = "vgrefine") -> tuple[float, float]:
    """95 % paired bootstrap CI of accuracy(``key``) - accuracy(baseline)."""
    if not rows:
        return float("nan"), float("nan")
    ans = np.array([r["answer"] for r in rows])
    d = (np.array([r[key] for r in rows]) == ans).astype(float) - (np.array([r["baseline"] for r in rows]) == ans)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


# ============================================================================================ tuned VGRefine (issue 15)
TUNE_SEEDS = (1001, 1002, 1003)
TUNE_SPACE = dict(percentiles=(70.0, 80.0, 85.0, 90.0, 95.0), magnitude_thresholds=(0.1, 0.2), ks=(1, 2, 4, 8),
                  stage2_top=2)


def tuning_examples(images, test, limit: int | None = None, seeds: Sequence[int] = TUNE_SEEDS) -> list[dict]:
    """The calibration split of the knockout search: the VGMED ``calibration`` slices (never the test slices;
    the reference VLM's training slices are >= 3 mm from every VGMED slice) with fresh lesion placements
    (one ``yes`` and one ``no`` question per target and seed). Raises if an image is shared with ``test``."""
    from . import reference_task as rt

    out = []
    for s in seeds:
        for e in rt.heldout_examples(images=images, split_group="calibration", limit=limit, seed=int(s)):
            e = dict(e, id=f"{e['id']}/seed{s}")
            out.append(e)
    from .data.atlas import ATLAS_SLICES

    overlap = {e["image_key"] for e in out} & {e["image_key"] for e in test}
    if overlap or any(e["split_group"] != "calibration" for e in out):
        raise RuntimeError(f"tuning split shares images with the test split: {sorted(overlap)}")
    if set(ATLAS_SLICES) & set(rt.training_slice_indices()):
        raise RuntimeError("a VGMED slice is among the reference VLM's training slices")
    return out


def evaluate_tuned(model, processor, examples, config, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Yes/no answers of :class:`~hf_vgrefine.vgrefine.VGRefineWrapper` with ``config`` (larger logit)."""
    import torch

    from .vgrefine import VGRefineWrapper

    yes, no = _answer_token_ids(processor)
    wrapper = VGRefineWrapper(model, config, processor=processor)
    out = []
    bar = _bar(len(examples), "tuned VGRefine", progress)
    try:
        for _, batch, inputs in _batches(model, processor, examples, batch_size, config.instruction):
            with torch.no_grad():
                logits = wrapper(**inputs).logits[:, -1].float()
            out += ["yes" if float(logits[i, yes]) > float(logits[i, no]) else "no" for i in range(len(batch))]
            bar.update(len(batch))
    finally:
        bar.close()
    return out


def _run_tuning(model, processor, images, test, cfg, out, calibration_limit, batch_size, progress, timing):
    """Knockout search on the tuning split (written to ``out/search``) and the tuned config's test answers."""
    from .outdir import StagedDir
    from .tuning import search_knockout

    t = time.perf_counter()
    calib = tuning_examples(images, test, limit=calibration_limit)
    _say(f"[demo] tuning VGRefine's knockout on {len(calib)} calibration questions (accuracy gain)", progress)
    with StagedDir(out, "search", "demo") as stage:   # renamed over a previous demo's search at the end
        res = search_knockout(model, processor, calib, cfg, space=TUNE_SPACE, batch_size=max(batch_size, 48),
                              output_dir=str(stage.path), progress=progress)
    if stage.kept is not None:
        _say(f"[demo] an existing {Path(out) / 'search'} not written by the demo was kept as {stage.kept}", progress)
    timing["tune_search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    answers = evaluate_tuned(model, processor, test, res.config, batch_size=batch_size, progress=progress)
    timing["tune_test_s"] = time.perf_counter() - t
    res.info["n_slices"] = len({e["image_key"] for e in calib})
    return res, answers


def _tuned_accuracy(rows) -> dict:
    a = _accuracy_block(rows, "vgrefine_tuned")
    b = _accuracy_block(rows, "baseline")
    lo, hi = _bootstrap_diff(rows, key="vgrefine_tuned")
    return {"vgrefine_tuned": {"accuracy": _r(a["accuracy"]), "n": a["n"]},
            "tuned_difference": _r(a["accuracy"] - b["accuracy"]), "tuned_difference_ci": [_r(lo), _r(hi)]}


def _tuning_block(res, accuracy) -> dict:
    ch = res.chosen
    target = _r(accuracy["oracle_difference"] / 2.0)
    lo = accuracy["tuned_difference_ci"][0]
    return {"chosen": ch["label"], "config": res.config.to_dict(), "calibration_gain": _r(ch["gain"]),
            "calibration_gain_ci": [_r(v) for v in ch["gain_ci"]], "best": res.info["best"]["label"],
            "best_gain": _r(res.info["best"]["gain"]), "n_calibration": res.info["n_calibration"],
            "n_candidates": res.info["n_candidates"], "n_slices": res.info.get("n_slices"), "seeds": list(TUNE_SEEDS),
            "rule": res.info["rule"], "kept_fraction": _r(ch["kept_fraction"]), "kept_in_region": _r(ch["kept_in_region"]),
            "kept_distractor": _r(ch["kept_distractor"]), "target_gain": target,
            "target_reached": bool(lo is not None and lo > 0 and accuracy["tuned_difference"] >= target),
            "search_s": res.info["total_s"], "figure": res.files.get("figure"), "report": "search/" + res.files["report"]}


# ============================================================================================ figures
def _overlay_figure(examples, maps, adapter, processor, layer: int, path: str) -> str:
    from .viz import new_figure, plot_attention_overlay, plot_triage_overlay, save_figure

    idx = sorted(maps)
    cols = ["image, named structure (green), lesions (red)", f"before: relative attention, layer {layer}",
            "VGRefine triage map (white: kept)", f"after knockout: relative attention, layer {layer}"]
    fig = new_figure((3.3 * len(cols), 3.6 * len(idx) + 0.3))
    for r, i in enumerate(idx):
        e = examples[i]
        grid = adapter.token_grid(processor, e["image"].size)
        img = np.asarray(e["image"].convert("L"))
        mask = np.asarray(e["mask"].convert("L"))
        m = maps[i]
        ax = fig.add_subplot(len(idx), len(cols), r * len(cols) + 1)
        ax.imshow(img, cmap="gray", interpolation="nearest")
        if mask.any():
            ax.contour(np.arange(img.shape[1]) + 0.5, np.arange(img.shape[0]) + 0.5, (mask > 0).astype(float),
                       levels=[0.5], colors=["lime"], linewidths=1.2)
        for x, y, rad, _ in e.get("lesions", []):
            from matplotlib.patches import Circle

            ax.add_patch(Circle((x + 0.5, y + 0.5), rad + 3, fill=False, edgecolor="red", linewidth=1.0))
        ax.set_xticks([])
        ax.set_yticks([])
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(e["question"], 44)) + f"\nanswer: {e['answer']}", fontsize=7)
        for c, key in enumerate(("before", "triage", "after"), start=2):
            ax = fig.add_subplot(len(idx), len(cols), r * len(cols) + c)
            vals = np.asarray(m[key], dtype=np.float64)
            title = cols[c - 1] if r == 0 else None
            if key == "triage":
                plot_triage_overlay(img, vals, m["keep"], grid, mask=mask, ax=ax, colorbar=True, alpha=0.55,
                                    title=title, colorbar_label="triage score (question / generic)")
            else:
                plot_attention_overlay(img, vals, grid, mask=mask, ax=ax, colorbar=True, alpha=0.55, title=title,
                                       colorbar_label="relative attention (question / generic)")
    fig.tight_layout()
    save_figure(fig, path, bbox_inches=None)
    return path


# ============================================================================================ main entry
def run_demo(model: str | None = None, out_dir: str | os.PathLike = "hf_vgrefine_demo", limit: int | None = None,
             calibration_limit: int | None = None, k: int | None = None, percentile: float = 80.0,
             batch_size: int = 16, seed: int = 0, html_report: bool = True, n_overlays: int = 3,
             progress: bool = True, dtype: str = "float32", device: str | None = None, threads: int | None = None,
             command: str | None = None, tune: bool = True, overwrite: bool = False) -> dict:
    """Run the demo and write the report; returns the results dict (also saved as ``results.json``).

    Args:
        model: hub id or local folder (default: the shipped reference VLM).
        out_dir: report folder (created and marked as the demo's; a folder holding other files is refused
            unless ``overwrite=True``, which writes the demo's files and keeps every other file).
        limit: test targets to use (2 examples each; default all 226 of the 8 test slices).
        calibration_limit: calibration targets (default all 48 of the 2 calibration slices).
        k: sensitive heads to select (default ``min(20, max(2, layers*heads // 4))``).
        percentile: VGRefine triage percentile (80 = released default).
        batch_size: prompts per forward pass. ``seed``: lesion placement of the held-out examples.
        html_report: also write ``report.html``. ``n_overlays``: examples in the before/after figure.
        threads: torch CPU threads (default: 1 for the reference model — as fast as 2 for a model this small
            and not slowed down by other processes — else torch's default).
        tune: also search the knockout settings on a calibration split (:mod:`hf_vgrefine.tuning`) and report
            the tuned VGRefine on the same test questions.
    """
    import torch
    import transformers

    from . import reference_task as rt
    from .adapters import get_adapter
    from .calibrate import calibrate
    from .data import load_vgmed
    from .measure import load_model_and_processor, measure_grounding
    from .viz import plot_layer_curves

    t_all = time.perf_counter()
    timing = {}
    if threads is None and not model:
        threads = 1   # the reference model is tiny: one thread is as fast and immune to CPU oversubscription
    if threads:
        torch.set_num_threads(int(threads))
    from .outdir import StagedDir, claim_output_dir

    model_id = str(model) if model else str(reference_model_dir())
    _say(f"[demo] loading model {model_id}", progress)
    t = time.perf_counter()
    mdl, processor = load_model_and_processor(model_id, dtype=dtype, device=device)
    adapter = get_adapter(mdl)
    timing["load_model_s"] = time.perf_counter() - t
    # the output folder is touched only once the model loaded; a folder with files the demo did not write is
    # refused unless overwrite=True, and nothing the package did not create is ever deleted
    out = claim_output_dir(out_dir, "demo", overwrite=overwrite)

    _say("[demo] loading VGMED atlas (built on first use, offline)", progress)
    t = time.perf_counter()
    ds = load_vgmed("atlas")
    images = rt.images_from_vgmed(ds)
    test = rt.heldout_examples(images=images, split_group="test", limit=limit, seed=seed)
    calib = rt.heldout_examples(images=images, split_group="calibration", limit=calibration_limit, seed=seed)
    timing["data_s"] = time.perf_counter() - t
    if not test or not calib:
        raise ValueError("no test or calibration examples (check --limit)")

    _say(f"[demo] measuring grounding per layer on {len(test)} test examples", progress)
    t = time.perf_counter()
    res = measure_grounding(mdl, processor, test, layers="all", relative=True, batch_size=batch_size,
                            scores=list(SCORES), progress=progress)
    summ = res.summary(n_boot=1000, seed=0)
    timing["measure_s"] = time.perf_counter() - t

    L, H = adapter.num_layers, adapter.num_heads
    k_eff = int(k) if k else min(20, max(2, (L * H) // 4))
    _say(f"[demo] calibrating (masked layer + top-{k_eff} heads) on {len(calib)} calibration examples", progress)
    t = time.perf_counter()
    with StagedDir(out, "calibration", "demo") as stage:   # fresh (calibration folders resume), renamed at the end
        cfg = calibrate(mdl, processor, calib, k=k_eff, split_group=None, percentile=percentile,
                        batch_size=batch_size, output_dir=str(stage.path), progress=progress)
    if stage.kept is not None:
        _say(f"[demo] an existing {out / 'calibration'} not written by the demo was kept as {stage.kept}", progress)
    timing["calibrate_s"] = time.perf_counter() - t

    _say("[demo] baseline vs VGRefine on the test examples", progress)
    t = time.perf_counter()
    yes_idx = [i for i, e in enumerate(test) if e["answer"] == "yes"]
    pick = yes_idx[:: max(1, len(yes_idx) // max(1, n_overlays))][:n_overlays]
    ev = evaluate_refinement(mdl, processor, test, cfg, batch_size=batch_size, progress=progress, keep_maps_for=pick)
    rows = ev["per_example"]
    timing["refine_s"] = time.perf_counter() - t

    tuning = None
    if tune:
        tuning, tuned_answers = _run_tuning(mdl, processor, images, test, cfg, out, calibration_limit, batch_size,
                                            progress, timing)
        for r_, a_ in zip(rows, tuned_answers):
            r_["vgrefine_tuned"] = a_

    # ---------------------------------------------------------------- numbers (rounded once, used everywhere)
    def curve(kind, score):
        d = summ[(summ["kind"] == kind) & (summ["score"] == score)].sort_values("layer")
        return {s: [_r(v) for v in d[s].tolist()] for s in ("mean", "median", "ci_low", "ci_high")} | \
               {"n": [int(v) for v in d["n"].tolist()]}

    grounding = {"layers": res.layers, "n": len(res), "gt": "box",
                 "relative": {s: curve("relative", s) for s in SCORES},
                 "raw": {s: curve("raw", s) for s in SCORES},
                 "chance": {s: _r(summ[summ["score"] == s]["chance"].iloc[0]) for s in SCORES}}
    ar = grounding["relative"]["attention_ratio"]["mean"]
    best = int(np.nanargmax(np.array([np.nan if v is None else v for v in ar], dtype=float)))
    grounding["best_layer"] = res.layers[best]
    grounding["best_layer_ar"] = ar[best]
    acc_b, acc_v = _accuracy_block(rows, "baseline"), _accuracy_block(rows, "vgrefine")
    acc_o = _accuracy_block(rows, "oracle")
    lo, hi = _bootstrap_diff(rows)
    o_lo, o_hi = _bootstrap_diff(rows, key="oracle")
    accuracy = {"baseline": {k_: _r(v) if isinstance(v, float) else v for k_, v in acc_b.items()},
                "vgrefine": {k_: _r(v) if isinstance(v, float) else v for k_, v in acc_v.items()},
                "oracle": {k_: _r(v) if isinstance(v, float) else v for k_, v in acc_o.items()},
                "difference": _r(acc_v["accuracy"] - acc_b["accuracy"]), "difference_ci": [_r(lo), _r(hi)],
                "oracle_difference": _r(acc_o["accuracy"] - acc_b["accuracy"]),
                "oracle_difference_ci": [_r(o_lo), _r(o_hi)],
                "n_flipped": int(sum(r["baseline"] != r["vgrefine"] for r in rows)),
                **(_tuned_accuracy(rows) if tuning else {}),
                "top1_is_yes_no": {"baseline": _r(_mean(rows, "baseline_top1_is_yes_no")),
                                   "vgrefine": _r(_mean(rows, "vgrefine_top1_is_yes_no"))}}
    masked = {"layer": ev["layer"],
              "baseline": {"attention_ratio": _r(_mean(rows, "ar_before")), "region_mass": _r(_mean(rows, "mass_before")),
                           "image_mass": _r(_mean(rows, "image_mass_before"))},
              "vgrefine": {"attention_ratio": _r(_mean(rows, "ar_after")), "region_mass": _r(_mean(rows, "mass_after")),
                           "image_mass": _r(_mean(rows, "image_mass_after")),
                           "kept_fraction": _r(_mean(rows, "kept_fraction")),
                           "kept_in_region": _r(_mean(rows, "kept_in_region")),
                           "triage_attention_ratio": _r(_mean(rows, "triage_ar"))},
              "oracle": {"attention_ratio": _r(_mean(rows, "ar_oracle")), "region_mass": _r(_mean(rows, "mass_oracle")),
                         "kept_fraction": _r(_mean(rows, "oracle_kept_fraction"))},
              "chance_region_mass": _r(_mean(rows, "f")),
              "control_transposed_mask": {"attention_ratio": _r(_mean(rows, "ar_before_transposed")),
                                          "triage_attention_ratio": _r(_mean(rows, "triage_ar_transposed"))}}
    calib_info = {"masked_layers": cfg.masked_layers, "sensitive_heads": cfg.sensitive_heads,
                  "percentile": cfg.percentile, "k": k_eff, "n_samples": cfg.calibration.get("n_samples"),
                  "rule": cfg.calibration.get("rule"), "layer_curves": cfg.calibration.get("layer_curves"),
                  "config": "calibration/vgrefine_config.json"}

    # ---------------------------------------------------------------- figures
    t = time.perf_counter()
    plot_layer_curves(summ, path=str(out / FIGURES["grounding_curve"]),
                      scores=["attention_ratio", "energy_pointing_game"], kinds=["relative", "raw"],
                      title=f"Last-token attention vs the named structure ({len(res)} held-out examples)")
    _overlay_figure(test, ev["maps"], adapter, processor, ev["layer"], str(out / FIGURES["overlays"]))
    timing["figures_s"] = time.perf_counter() - t
    timing = {k_: round(v, 2) for k_, v in timing.items()}
    timing["total_s"] = round(time.perf_counter() - t_all, 2)

    cfg_model = mdl.config
    grid0 = adapter.token_grid(processor, test[0]["image"].size)
    results = {
        "command": command or "run_demo()",
        "model": {"name": model_id if model else "hf_vgrefine reference VLM (resources/reference_vlm)",
                  "path": model_id, "architecture": type(mdl).__name__, "num_layers": L, "num_heads": H,
                  "grid": [grid0.rows, grid0.cols],
                  "model_type": getattr(cfg_model, "model_type", None)},
        "data": {"config": "atlas", "task": rt.QUESTION, "seed": seed, "n_test": len(test), "n_calibration": len(calib),
                 "n_slices_test": len({e["image_key"] for e in test}),
                 "n_slices_calibration": len({e["image_key"] for e in calib}),
                 "limit": limit, "calibration_limit": calibration_limit},
        "grounding": grounding,
        "calibration": calib_info,
        "accuracy": accuracy,
        "masked_layer_grounding": masked,
        **({"tuning": _tuning_block(tuning, accuracy)} if tuning else {}),
        "figures": {k_: v for k_, v in FIGURES.items()},
        "overlay_examples": [test[i]["id"] for i in sorted(ev["maps"])],
        "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "timing": timing,
    }
    from .atomic import atomic_write
    from .jsonio import write_json

    write_json(str(out / RESULTS_JSON), results)
    atomic_write(out / "per_example.jsonl", "".join(
        json.dumps({k_: (v if not isinstance(v, float) or math.isfinite(v) else None) for k_, v in r.items()}) + "\n"
        for r in rows))
    md = render_markdown(json.loads((out / RESULTS_JSON).read_text()))
    atomic_write(out / REPORT_MD, md)
    if html_report:
        atomic_write(out / REPORT_HTML, render_html(results, md))
    _say(summary_lines(results, out), progress)
    return results


