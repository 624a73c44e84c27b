"""Report of a knockout search (:func:`hf_vgrefine.tuning.search_knockout`): Markdown table of the candidates,
gain-vs-percentile figure, and the files written next to the chosen config."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tuning import SearchResult

__all__ = ["FIGURE_PNG", "REPORT_MD", "RESULTS_JSON", "plot_gain_vs_percentile", "report_markdown", "write_report"]

REPORT_MD = "search_report.md"
RESULTS_JSON = "search_results.json"
FIGURE_PNG = "search_gain_vs_percentile.png"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else "n/a"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"
    return str(v)


def report_markdown(result: SearchResult, top: int = 25) -> str:
    info, ch = result.info, result.chosen
    rows = sorted(result.table, key=lambda r: -r["gain"])
    keep = rows[:top] + [r for r in rows[top:] if r["is_base"] or r["is_chosen"]]
    head = ["candidate", "stage", "accuracy", "gain", "gain 95% CI", "within noise of best", "knobs changed",
            "kept", "kept in region", "kept distractor", "note"]
    lines = ["# VGRefine knockout search (calibration split)", "",
             f"Calibration split: **{info['n_calibration']} questions** (split_group={info['split_group']!r}), "
             f"**{info['n_candidates']} candidates** ({info['strategy']} search; "
             f"{info['n_per_candidate_ratio']} questions per candidate). Baseline accuracy "
             f"{result.baseline['accuracy']:.3f}. Standard error of one candidate's gain ≈ "
             f"{_fmt(info['se_of_a_gain'])}: with this many candidates the best calibration gain is biased upwards; "
             "judge a setting by its gain on held-out test data.", "",
             f"Chosen: **{ch['label']}** — gain {ch['gain']:+.3f} (95% CI {_fmt(ch['gain_ci'])}); "
             f"best: {info['best']['label']} ({info['best']['gain']:+.3f}); base config {info['base']['label']} "
             f"({info['base']['gain']:+.3f}).", "", f"Rule: {info['rule']}.", "",
             "Diagnostics: *kept* = fraction of image tokens kept by the triage; *kept in region* = fraction of the "
             "named region's tokens kept; *kept distractor* = fraction of the tokens of lesions outside the named "
             f"region kept ({info['n_with_region']} questions with a region, {info['n_with_distractors']} with "
             "distractors).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in keep:
        note = ", ".join(x for x, f in (("chosen", r["is_chosen"]), ("best", r["is_best"]), ("base", r["is_base"])) if f)
        vals = [r["label"], r["stage"], r["accuracy"], f"{r['gain']:+.3f}", _fmt(r["gain_ci"]),
                r["within_noise_of_best"], r["changes_from_base"], r["kept_fraction"], r["kept_in_region"],
                r["kept_distractor"], note]
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", f"All {len(result.table)} candidates: `{RESULTS_JSON}`. Figure: `{FIGURE_PNG}` (gain vs percentile "
              "per masked layer set, stage 1 settings).", ""]
    return "\n".join(lines)


def plot_gain_vs_percentile(result: SearchResult, path: str | None = None):
    """Calibration gain (with paired 95 % CI) vs triage percentile, one line per masked-layer set, at the
    stage-1 settings (base ``k``, normalisation and knockout heads)."""
    from .viz import new_figure, save_figure

    base = next(r for r in result.table if r["is_base"])
    fig = new_figure((7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    sets = []
    for r in result.table:
        if r["percentile"] is not None and r["k"] == base["k"] and r["generic_norm"] == base["generic_norm"] \
                and r["knockout_heads"] == base["knockout_heads"] and r["masked_layers"] not in sets:
            sets.append(r["masked_layers"])
    for layers in sets:
        rs = sorted((r for r in result.table if r["masked_layers"] == layers and r["percentile"] is not None
                     and r["k"] == base["k"] and r["generic_norm"] == base["generic_norm"]
                     and r["knockout_heads"] == base["knockout_heads"]), key=lambda r: r["percentile"])
        x = [r["percentile"] for r in rs]
        y = [r["gain"] for r in rs]
        line, = ax.plot(x, y, marker="o", label="layer " + "+".join(map(str, layers)))
        ax.fill_between(x, [r["gain_ci"][0] for r in rs], [r["gain_ci"][1] for r in rs], color=line.get_color(),
                        alpha=0.12)
    ch = result.chosen
    if ch["percentile"] is not None:
        ax.scatter([ch["percentile"]], [ch["gain"]], s=120, facecolors="none", edgecolors="k", zorder=5,
                   label=f"chosen ({ch['label']})")
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    ax.set_xlabel("triage percentile (tokens below it are knocked out)")
    ax.set_ylabel("accuracy gain over baseline")
    ax.set_title(f"Knockout search on {result.info['n_calibration']} calibration questions (k={base['k']}, "
                 f"{base['generic_norm']}, ko:{base['knockout_heads']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def write_report(result: SearchResult, output_dir: str) -> dict:
    """Write the chosen config, the report, the full table and the figure into ``output_dir`` (atomically)."""
    from .atomic import atomic_write

    os.makedirs(output_dir, exist_ok=True)
    files = {"config": os.path.join(output_dir, "vgrefine_config.json"),
             "report": os.path.join(output_dir, REPORT_MD), "results": os.path.join(output_dir, RESULTS_JSON),
             "figure": os.path.join(output_dir, FIGURE_PNG)}
    result.config.save_pretrained(output_dir)
    plot_gain_vs_percentile(result, files["figure"])
    atomic_write(files["report"], report_markdown(result))
    atomic_write(files["results"], json.dumps(result.to_dict(), indent=1, default=float) + "\n")
    return {k: os.path.basename(v) for k, v in files.items()}
