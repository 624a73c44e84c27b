"""Med-VQA results: :class:`EvalReport`, the summary (closed accuracy per dataset + macro + micro with Wilson
CIs, open-ended table, paired McNemar comparisons), its Markdown rendering, and :func:`compare`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import CLOSED, OPEN
from .scorers import SCORER_VERSION
from .stats import paired_comparison, summarise_closed, summarise_open

__all__ = ["EvalReport", "build_summary", "compare", "summary_markdown"]


@dataclass
class EvalReport:
    """Result of :func:`evaluate`.

    ``summary``: the JSON written to ``summary.json`` (see :func:`build_summary`); ``records``: per-item
    records of this run's items (method order, then item order); ``manifest``; ``out_dir``.
    """

    summary: dict[str, Any]
    records: list[dict]
    manifest: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.summary["methods"])

    def accuracy(self, method: str, dataset: str | None = None) -> float | None:
        """Closed-ended accuracy (fraction) of ``method`` on ``dataset`` (None: micro average)."""
        row = self.summary["closed"][method]
        return row["micro"]["accuracy"] if dataset is None else row["datasets"][dataset]["accuracy"]

    def to_markdown(self) -> str:
        return summary_markdown(self.summary)


def build_summary(records: Sequence[dict], methods: Sequence[str], datasets: Sequence[str], *,
                  scorer: str, prompt_template: str, instruction: str | None, removed: Mapping[str, int] | None = None,
                  bundle_identical: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Summary dict: per-method closed accuracy table (datasets + macro + micro, Wilson CIs, extraction
    steps), open-ended table, paired comparisons of every method against the first, failures, counts."""
    by_m: dict[str, list[dict]] = {m: [] for m in methods}
    for r in records:
        if r["method"] in by_m:
            by_m[r["method"]].append(r)
    closed = {m: summarise_closed([r for r in by_m[m] if r["answer_type"] == CLOSED], datasets) for m in methods}
    open_ = {m: summarise_open([r for r in by_m[m] if r["answer_type"] == OPEN], datasets) for m in methods}
    closed_ds = [d for d in datasets if any(closed[m]["datasets"].get(d, {}).get("n") for m in methods)]
    for m in methods:
        closed[m]["datasets"] = {d: closed[m]["datasets"][d] for d in closed_ds}
    comparisons = []
    for m in methods[1:]:
        ra = {r["id"]: r for r in by_m[methods[0]] if r["answer_type"] == CLOSED}
        rb = {r["id"]: r for r in by_m[m] if r["answer_type"] == CLOSED}
        comparisons.append(paired_comparison(ra, rb, closed_ds, methods[0], m))
    failures = [{"method": r["method"], "id": r["id"], "dataset": r["dataset"], "error": r["error"]}
                for r in records if r.get("error") is not None]
    counts: dict[str, Any] = {"items": {}, "removed": dict(removed or {})}
    for r in by_m[methods[0]] if methods else []:
        key = f"{r['dataset']} ({r['answer_type']})"
        counts["items"][key] = counts["items"].get(key, 0) + 1
    return {
        "methods": list(methods),
        "datasets": closed_ds,
        "columns": [*closed_ds, "macro", "micro"],
        "scorer": {"name": scorer, "version": SCORER_VERSION},
        "prompt": {"template": prompt_template, "instruction": instruction},
        "definitions": {"accuracy": "correct / items per dataset (closed-ended, after filtering, errors excluded)",
                        "macro": "unweighted mean of the per-dataset accuracies over the datasets shown",
                        "micro": "pooled correct / pooled items over all datasets",
                        "ci": "95% Wilson score interval",
                        "p_value": "exact two-sided McNemar test (binomial test on discordant pairs)"},
        "closed": closed,
        "open": open_,
        "comparisons": comparisons,
        "failures": failures,
        "counts": counts,
        "bundle_identical": dict(bundle_identical or {}),
    }


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown rendering of :func:`build_summary` output (study-table shape)."""
    ds, methods = summary["datasets"], summary["methods"]
    lines = ["# Med-VQA evaluation", "", "## Closed-ended accuracy (%)", "",
             "| method | " + " | ".join(ds) + " | Macro | Micro |",
             "|---|" + "---|" * (len(ds) + 2)]
    for m in methods:
        row = summary["closed"][m]
        cells = [_pct(row["datasets"][d]["accuracy"]) for d in ds]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(row['macro']['accuracy'])} | "
                     f"{_pct(row['micro']['accuracy'])} |")
    lines += ["", "Items and 95% Wilson intervals:", "",
              "| method | " + " | ".join(ds) + " | Micro |", "|---|" + "---|" * (len(ds) + 1)]
    for m in methods:
        row = summary["closed"][m]
        cells = [f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}] (n={c['n']})"
                 for c in (row["datasets"][d] for d in ds)]
        mi = row["micro"]
        lines.append(f"| {m} | " + " | ".join(cells) +
                     f" | {_pct(mi['accuracy'])} [{_pct(mi['ci_low'])}, {_pct(mi['ci_high'])}] (n={mi['n']}) |")
    d = summary["definitions"]
    lines += ["", f"Macro: {d['macro']}. Micro: {d['micro']}.",
              (f"Scorer: `{summary['scorer']['name']}` v{summary['scorer']['version']}. "
               f"Instruction appended: {summary['prompt']['instruction']!r}."), ""]
    steps = sorted({s for m in methods for s in summary["closed"][m]["steps"]})
    if steps:
        lines += ["Extraction steps (items):", "", "| method | " + " | ".join(steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for m in methods:
            st = summary["closed"][m]["steps"]
            lines.append(f"| {m} | " + " | ".join(str(st.get(s, 0)) for s in steps) + " |")
        lines.append("")
    for c in summary["comparisons"]:
        a, b = c["a"], c["b"]
        lines += [f"## Paired comparison: {b} vs {a}", "",
                  f"| dataset | n | {a} | {b} | Δ (pp) | only {a} correct | only {b} correct | McNemar p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, cell in [*c["datasets"].items(), ("all", c["overall"])]:
            delta = "–" if cell["delta"] is None else f"{100 * cell['delta']:+.1f}"
            lines.append(f"| {name} | {cell['n']} | {_pct(cell['acc_a'])} | {_pct(cell['acc_b'])} | {delta} | "
                         f"{cell['a_only']} | {cell['b_only']} | {cell['p_value']:.4g} |")
        gained = sum(f["change"] == "gained" for f in c["flipped"])
        lines += ["", (f"Flipped items: {len(c['flipped'])} ({gained} gained, {len(c['flipped']) - gained} lost); "
                       "listed in summary.json."), ""]
    if any(summary["open"][m] for m in methods):
        lines += ["## Open-ended (reported separately)", "", "| method | dataset | n | exact match (%) | token recall (%) |",
                  "|---|---|---|---|---|"]
        for m in methods:
            for dname, cell in summary["open"][m].items():
                lines.append(f"| {m} | {dname} | {cell['n']} | {_pct(cell['exact_match'])} | {_pct(cell['recall'])} |")
        lines.append("")
    counts = summary["counts"]
    lines += ["## Items", "", ", ".join(f"{k}: {v}" for k, v in counts["items"].items()) or "none"]
    if counts["removed"]:
        lines.append("Removed by filtering: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["removed"].items())))
    not_bundle = [k for k, v in summary.get("bundle_identical", {}).items() if not v]
    if not_bundle:
        lines.append("Not bundle-identical (raw loaders; yes/no converted to two-option MCQ): " + ", ".join(not_bundle))
    if summary["failures"]:
        lines += ["", f"## Failures ({len(summary['failures'])} items excluded)", ""]
        lines += [f"- {f['method']} {f['id']}: {f['error']}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def compare(report_a: EvalReport, report_b: EvalReport | None = None, method_a: str | None = None,
            method_b: str | None = None) -> dict[str, Any]:
    """Paired comparison (per-dataset deltas, exact McNemar, flipped items) of two methods, either both
    in ``report_a`` (default: its first two methods) or one from each report."""
    if report_b is None:
        report_b = report_a
        method_a = method_a or report_a.methods[0]
        method_b = method_b or report_a.methods[1]
    method_a = method_a or report_a.methods[0]
    method_b = method_b or report_b.methods[0]
    ra = {r["id"]: r for r in report_a.records if r["method"] == method_a and r["answer_type"] == CLOSED}
    rb = {r["id"]: r for r in report_b.records if r["method"] == method_b and r["answer_type"] == CLOSED}
    datasets = list(dict.fromkeys([*report_a.summary["datasets"], *report_b.summary["datasets"]]))
    return paired_comparison(ra, rb, datasets, method_a, method_b)
