"""Accuracy with Wilson intervals, macro/micro averages and exact McNemar tests."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (fractions in [0, 1]); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_cell(correct: int, n: int) -> dict[str, Any]:
    """``{n, correct, accuracy, ci_low, ci_high}`` (fractions; accuracy None when n == 0)."""
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": (correct / n) if n else None, "ci_low": lo, "ci_high": hi}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of ``b`` successes in ``b + c`` discordant pairs
    at p = 0.5 (``b``: only method A correct, ``c``: only method B correct); 1.0 without discordance."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def summarise_closed(records: Iterable[dict], datasets: Sequence[str]) -> dict[str, Any]:
    """Per-dataset accuracy cells plus ``macro`` (mean of per-dataset accuracies over datasets with
    items) and ``micro`` (pooled correct / pooled n) for records of one method (errors excluded)."""
    per: dict[str, list[int]] = {d: [0, 0] for d in datasets}
    steps: dict[str, int] = {}
    for r in records:
        if r.get("error") is not None or r.get("correct") is None:
            continue
        c = per.setdefault(r["dataset"], [0, 0])
        c[0] += int(bool(r["correct"]))
        c[1] += 1
        if r.get("step") is not None:
            steps[r["step"]] = steps.get(r["step"], 0) + 1
    cells = {d: accuracy_cell(*per[d]) for d in per}
    accs = [v["accuracy"] for v in cells.values() if v["n"]]
    tot_c = sum(v[0] for v in per.values())
    tot_n = sum(v[1] for v in per.values())
    macro = sum(accs) / len(accs) if accs else None
    return {"datasets": cells, "macro": {"accuracy": macro, "n_datasets": len(accs)},
            "micro": accuracy_cell(tot_c, tot_n), "steps": dict(sorted(steps.items()))}


def summarise_open(records: Iterable[dict], datasets: Sequence[str]) -> dict[str, Any]:
    """Per-dataset ``{n, exact_match, recall}`` (means, fractions) for open-ended records."""
    per: dict[str, list[float]] = {}
    for r in records:
        if r.get("error") is not None or r.get("recall") is None:
            continue
        c = per.setdefault(r["dataset"], [0, 0.0, 0.0])
        c[0] += 1
        c[1] += float(bool(r["exact"]))
        c[2] += float(r["recall"])
    out = {}
    for d in [*datasets, *[k for k in per if k not in datasets]]:
        if d in per:
            n, e, rc = per[d]
            out[d] = {"n": int(n), "exact_match": e / n, "recall": rc / n}
    return out


def paired_comparison(rec_a: dict[str, dict], rec_b: dict[str, dict], datasets: Sequence[str],
                      name_a: str, name_b: str) -> dict[str, Any]:
    """Paired comparison of two methods on the items both scored (keys: item id → record).

    Per dataset and overall: ``n`` pairs, ``acc_a``/``acc_b``, ``delta`` (B − A, fraction),
    ``a_only`` / ``b_only`` (discordant counts), exact McNemar ``p_value``; plus ``flipped``: items whose
    verdict differs (``"gained"``: wrong under A, right under B; ``"lost"``: the reverse).
    """
    common = [k for k in rec_a if k in rec_b and rec_a[k].get("correct") is not None
              and rec_b[k].get("correct") is not None]
    by_ds: dict[str, list[tuple[bool, bool]]] = {}
    flipped = []
    for k in common:
        a, b = bool(rec_a[k]["correct"]), bool(rec_b[k]["correct"])
        by_ds.setdefault(rec_a[k]["dataset"], []).append((a, b))
        if a != b:
            flipped.append({"id": k, "dataset": rec_a[k]["dataset"], "change": "gained" if b else "lost",
                            f"response_{name_a}": rec_a[k].get("response"),
                            f"response_{name_b}": rec_b[k].get("response")})

    def cell(pairs):
        n = len(pairs)
        ca = sum(a for a, _ in pairs)
        cb = sum(b for _, b in pairs)
        a_only = sum(a and not b for a, b in pairs)
        b_only = sum(b and not a for a, b in pairs)
        return {"n": n, "acc_a": ca / n if n else None, "acc_b": cb / n if n else None,
                "delta": (cb - ca) / n if n else None, "a_only": a_only, "b_only": b_only,
                "p_value": mcnemar_exact(a_only, b_only)}

    order = [d for d in datasets if d in by_ds] + [d for d in by_ds if d not in datasets]
    per = {d: cell(by_ds[d]) for d in order}
    all_pairs = [p for d in order for p in by_ds[d]]
    deltas = [v["delta"] for v in per.values() if v["n"]]
    return {"a": name_a, "b": name_b, "datasets": per, "overall": cell(all_pairs),
            "macro_delta": sum(deltas) / len(deltas) if deltas else None, "flipped": flipped}
