"""The demo's report: ``report.md`` / ``report.html`` tables and text from ``results.json``, and the summary
lines printed at the end of :func:`hf_vgrefine.demo.run_demo`."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

__all__ = ["FIGURES", "LAYER_HEADER", "REPORT_HTML", "REPORT_MD", "RESULTS_JSON", "TABLE_HEADER", "TABLE_METHODS", "render_html", "render_markdown",
           "summary_lines", "tuned_lines", "fmt"]

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RESULTS_JSON = "results.json"
FIGURES = {
    "grounding_curve": "grounding_per_layer.png",
    "overlays": "overlays_before_after.png",
    "calibration_heads": "calibration/calibration_heads.png",
}


def _table_rows(results: dict) -> list[list]:
    rows = []
    for label, key in TABLE_METHODS:
        a, g = results["accuracy"][key], results["masked_layer_grounding"][key]
        rows.append([label, a["accuracy"], a["recall_yes"], a["recall_no"], g["attention_ratio"], g["region_mass"],
                     a["n"]])
    return rows


TABLE_METHODS = (("baseline", "baseline"), ("VGRefine", "vgrefine"), ("oracle knockout", "oracle"))


TABLE_HEADER = ["method", "accuracy", "recall yes", "recall no", "AR (masked layer, raw)",
                "attention mass in region", "n"]


def fmt(v) -> str:
    """A number for the report (4 decimals, n/a for missing or non-finite)."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


def _layer_rows(results: dict) -> list[list]:
    g = results["grounding"]
    rows = []
    for i, layer in enumerate(g["layers"]):
        rows.append([layer, g["relative"]["attention_ratio"]["mean"][i], g["relative"]["attention_ratio"]["ci_low"][i],
                     g["relative"]["attention_ratio"]["ci_high"][i], g["raw"]["attention_ratio"]["mean"][i],
                     g["relative"]["energy_pointing_game"]["mean"][i], g["chance"]["energy_pointing_game"]])
    return rows


LAYER_HEADER = ["layer", "AR relative (mean)", "95% CI low", "95% CI high", "AR raw (mean)",
                "attention mass in region (relative map)", "chance mass (= mean f)"]


def render_markdown(results: dict) -> str:
    r = results
    g, cal, t = r["grounding"], r["calibration"], r["timing"]
    acc = r["accuracy"]
    lines = [
        "# hf-vgrefine demo report",
        "",
        f"Model: `{r['model']['name']}` ({r['model']['architecture']}, {r['model']['num_layers']} layers x "
        f"{r['model']['num_heads']} heads, image grid {r['model']['grid'][0]}x{r['model']['grid'][1]} tokens). "
        f"Data: VGMED `atlas` ({r['data']['n_slices_test']} test slices, {r['data']['n_slices_calibration']} "
        "calibration slices), reference task *\"Is there an abnormality in the {structure}?\"* with synthetic "
        f"hypointense lesions: {r['data']['n_test']} test examples (balanced yes/no), {r['data']['n_calibration']} "
        "calibration examples. Every number below is read from "
        f"`{RESULTS_JSON}` written by this run (`{r['command']}`, {t['total_s']:.1f} s on {r['environment']['threads']} "
        f"CPU thread(s), torch {r['environment']['torch']}, transformers {r['environment']['transformers']}).",
        "",
        "## 1. Where does the model look? Grounding per layer",
        "",
        "Attention of the last prompt token to the image tokens, relative to the generic prompt "
        "(\"Write a general description of the image.\"), scored against the tokens of the **named** structure's "
        "box. Attention ratio (AR) = mean attention inside the region / mean over the image; chance = 1.",
        "",
        f"![grounding per layer]({FIGURES['grounding_curve']})",
        "",
        _md_table(LAYER_HEADER, _layer_rows(r)),
        "",
        f"Best layer: **{g['best_layer']}** (relative AR {fmt(g['best_layer_ar'])}; chance 1.0000).",
        "",
        f"Control (box -> token geometry): at masked layer {cal['masked_layers'][0]} the triage map scores relative AR "
        f"{fmt(r['masked_layer_grounding']['vgrefine']['triage_attention_ratio'])} against the named structure's "
        f"tokens and {fmt(r['masked_layer_grounding']['control_transposed_mask']['triage_attention_ratio'])} against "
        "the same token mask transposed (rows <-> cols); the raw last-token attention: "
        f"{fmt(r['masked_layer_grounding']['baseline']['attention_ratio'])} vs "
        f"{fmt(r['masked_layer_grounding']['control_transposed_mask']['attention_ratio'])}.",
        "",
        "## 2. Calibration (masked layer and sensitive heads)",
        "",
        f"On the {cal['n_samples']} calibration examples: masked layer **{cal['masked_layers']}**, "
        f"top-{len(cal['sensitive_heads'])} heads {cal['sensitive_heads']} (rule: {cal['rule']}); "
        f"triage percentile {cal['percentile']}. Config: `calibration/vgrefine_config.json`.",
        "",
        f"![calibration heads]({FIGURES['calibration_heads']})",
        "",
        "## 3. Baseline vs VGRefine (closed-ended yes/no, test slices)",
        "",
        _md_table(TABLE_HEADER, _table_rows(r)),
        "",
        f"Accuracy change VGRefine - baseline: {fmt(acc['difference'])} (95% paired bootstrap CI "
        f"[{fmt(acc['difference_ci'][0])}, {fmt(acc['difference_ci'][1])}]); answers flipped: "
        f"{acc['n_flipped']}. Attention columns: last-token attention at masked layer "
        f"{cal['masked_layers'][0]} (mean over heads, raw probabilities) before/after the knockout; "
        f"VGRefine kept {fmt(r['masked_layer_grounding']['vgrefine']['kept_fraction'])} of the image tokens and "
        f"{fmt(r['masked_layer_grounding']['vgrefine']['kept_in_region'])} of the region's tokens. "
        "*Oracle knockout* is the method's upper bound, not a usable method: it needs the answer's region and "
        "keeps exactly the named structure's box tokens "
        f"({fmt(r['masked_layer_grounding']['oracle']['kept_fraction'])} of the image); accuracy change vs baseline "
        f"{fmt(acc['oracle_difference'])} (95% CI [{fmt(acc['oracle_difference_ci'][0])}, "
        f"{fmt(acc['oracle_difference_ci'][1])}]).",
        "",
        *tuned_lines(r),
        "## 4. Heat-maps before / after VGRefine",
        "",
        f"Left: the image with the named structure (green contour) and the lesions (red circles). Then the relative "
        f"attention of the last prompt token at layer {cal['masked_layers'][0]} (question / generic prompt, mean over "
        "heads) before VGRefine, VGRefine's triage map (white outline: kept tokens) and the same attention with the "
        "knockout active (knocked-out tokens receive none).",
        "",
        f"![overlays]({FIGURES['overlays']})",
        "",
        "## Timing",
        "",
        _md_table(["stage", "seconds"], [[k.removesuffix("_s"), f"{v:.2f}"] for k, v in t.items()]),
        "",
    ]
    return "\n".join(lines)


def render_html(results: dict, markdown: str) -> str:
    """A self-contained HTML rendering of the same content (tables and images, no external assets)."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>hf-vgrefine demo report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #999;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"]
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f"<p><img alt='{html.escape(alt)}' src='{html.escape(src.rstrip(')'))}'></p>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            text = html.escape(line)
            import re

            text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", text)
            out.append(f"<p>{text}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def tuned_lines(r: dict) -> list[str]:
    t, acc = r.get("tuning"), r["accuracy"]
    if not t:
        return []
    a = acc["vgrefine_tuned"]
    reached = t["target_reached"]
    return [
        "## 3b. VGRefine tuned on the calibration split (knockout search)",
        "",
        f"`hf_vgrefine.tuning.search_knockout` searched {t['n_candidates']} knockout settings (masked layer(s), "
        f"number of sensitive heads, percentile / magnitude threshold, generic normalisation, knockout heads) on "
        f"{t['n_calibration']} calibration questions from the {t['n_slices']} calibration slices (fresh lesions, "
        f"seeds {t['seeds']}; disjoint from the test slices and from the model's training slices), objective: "
        f"accuracy gain over the baseline. Chosen (rule: {t['rule']}): **{t['chosen']}**, calibration gain "
        f"{fmt(t['calibration_gain'])} (95% CI [{fmt(t['calibration_gain_ci'][0])}, "
        f"{fmt(t['calibration_gain_ci'][1])}]); the best calibration candidate was {t['best']} "
        f"({fmt(t['best_gain'])}). Report: `search/search_report.md`; config: `search/vgrefine_config.json`.",
        "",
        "| method | accuracy | n | difference vs baseline | 95% paired CI |",
        "|---|---|---|---|---|",
        f"| baseline | {fmt(acc['baseline']['accuracy'])} | {acc['baseline']['n']} | | |",
        f"| VGRefine (grounding calibration) | {fmt(acc['vgrefine']['accuracy'])} | {acc['vgrefine']['n']} | "
        f"{fmt(acc['difference'])} | [{fmt(acc['difference_ci'][0])}, {fmt(acc['difference_ci'][1])}] |",
        f"| VGRefine (tuned on the calibration split) | {fmt(a['accuracy'])} | {a['n']} | "
        f"{fmt(acc['tuned_difference'])} | [{fmt(acc['tuned_difference_ci'][0])}, "
        f"{fmt(acc['tuned_difference_ci'][1])}] |",
        f"| oracle knockout (upper bound) | {fmt(acc['oracle']['accuracy'])} | {acc['oracle']['n']} | "
        f"{fmt(acc['oracle_difference'])} | [{fmt(acc['oracle_difference_ci'][0])}, "
        f"{fmt(acc['oracle_difference_ci'][1])}] |",
        "",
        f"Target (CI excludes 0 and gain >= half the oracle's, {fmt(t['target_gain'])}): "
        + ("**reached**." if reached else "**not reached** on this model: see the search report for what was tried and "
           f"the diagnostics (the chosen setting keeps {fmt(t['kept_fraction'])} of the image tokens, "
           f"{fmt(t['kept_in_region'])} of the region's and {fmt(t['kept_distractor'])} of the distractor "
           "lesions' tokens on the calibration split; the oracle keeps the region only)."),
        "",
        f"![gain vs percentile](search/{t['figure']})",
        "",
    ]


def summary_lines(r: dict, out: Path) -> str:
    a, g = r["accuracy"], r["grounding"]
    return "\n".join([
        f"[demo] grounding: best layer {g['best_layer']} with relative attention ratio {fmt(g['best_layer_ar'])} "
        f"(chance 1.0) on {g['n']} held-out examples",
        f"[demo] calibration: masked layer {r['calibration']['masked_layers']}, {len(r['calibration']['sensitive_heads'])} heads",
        f"[demo] accuracy: baseline {fmt(a['baseline']['accuracy'])} -> VGRefine {fmt(a['vgrefine']['accuracy'])} "
        f"(n={a['baseline']['n']}, difference {fmt(a['difference'])}, 95% CI [{fmt(a['difference_ci'][0])}, "
        f"{fmt(a['difference_ci'][1])}])",
        f"[demo] oracle knockout (upper bound, keeps only the named region): {fmt(a['oracle']['accuracy'])}",
        *([f"[demo] VGRefine tuned on the calibration split ({r['tuning']['chosen']}): "
           f"{fmt(a['vgrefine_tuned']['accuracy'])} (difference {fmt(a['tuned_difference'])}, 95% CI "
           f"[{fmt(a['tuned_difference_ci'][0])}, {fmt(a['tuned_difference_ci'][1])}])"] if "tuning" in r else []),
        f"[demo] total {r['timing']['total_s']:.1f} s; report: {out / REPORT_MD}",
    ])
