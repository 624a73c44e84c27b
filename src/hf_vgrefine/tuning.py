"""Tune VGRefine's knockout settings to a model on a labelled calibration split (accuracy gain as objective).

:func:`hf_vgrefine.calibrate.calibrate` chooses the masked layer and sensitive heads from grounding scores
only. :func:`search_knockout` (``calibrate(..., search=...)``, ``hf-vgrefine calibrate --search``) asks the
question that matters for answers: which knockout setting improves accuracy over the plain model on held-out,
labelled closed questions? It searches

* the masked layer(s): every single layer and every run of up to ``max_run`` consecutive layers;
* the number ``k`` of sensitive heads (the top-``k`` of the grounding ranking of :func:`calibrate`);
* the threshold: triage percentile, or magnitude threshold on the min-max-normalised triage map;
* the generic normalisation (``layer_mean`` as released, ``per_head``, ``none``);
* the knockout heads (``all`` heads of the masked layers as released, or only the ``sensitive`` ones).

Cost. Per calibration batch the question- and generic-prompt attention maps of **all** layers and heads are
captured once; every candidate's knockout set is derived from them, for the whole batch at once, by
:func:`hf_vgrefine.vgrefine.triage.triage_scores` and :func:`~hf_vgrefine.vgrefine.triage.knockout_set` (the
functions VGRefine itself runs). The knockout only changes the rows after the image, so the keys/values of every position before the
image end are the same for all candidates: they are computed once per batch (one prefix pass, vision tower
included) and each candidate runs only the text after the image on that cache — one short forward per
(candidate, unit), a unit being the samples of a batch whose image ends at the same position. A self-check
compares the first unit's cached-prefix logits with a full forward and falls back to full forwards if they
differ. Candidates with the same knockout (same layers, heads and knocked-out tokens) share one forward.

Noise. The report states the calibration split size next to the number of candidates, gives every
candidate's paired bootstrap 95 % CI of the accuracy gain over the baseline, and chooses by a rule that
prefers the simpler setting within noise: among the candidates whose paired CI of the accuracy difference to
the best candidate contains 0, the one that changes the fewest knobs of the starting config (the grounding
calibration with the released percentile 80, layer-mean normalisation, all-heads knockout), then with fewer
masked layers, fewer heads, and the higher gain.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .knockout_passes import answer_ids, knockout_logits, normalise_answer, prefix_units, rows_inputs
from .search_report import FIGURE_PNG, REPORT_MD, RESULTS_JSON, plot_gain_vs_percentile, report_markdown, write_report

__all__ = ["SearchSpace", "Candidate", "SearchResult", "search_knockout", "distractor_mask", "paired_bootstrap",
           "head_ranking_from_config", "TriageKnobs", "FIGURE_PNG", "REPORT_MD", "RESULTS_JSON",
           "plot_gain_vs_percentile", "report_markdown", "write_report"]


# ============================================================================================ search space
@dataclass(frozen=True)
class Candidate:
    """One knockout setting; ``k`` = number of top-ranked sensitive heads."""

    masked_layers: tuple
    k: int
    percentile: float | None = 80.0
    magnitude_threshold: float | None = None
    generic_norm: str = "layer_mean"
    knockout_heads: str = "all"

    @property
    def label(self) -> str:
        lay = "+".join(str(x) for x in self.masked_layers)
        thr = f"P{self.percentile:g}" if self.percentile is not None else f"mag{self.magnitude_threshold:g}"
        return f"L{lay} k{self.k} {thr} {self.generic_norm} ko:{self.knockout_heads}"

    def to_config(self, base, ranking: Sequence, notes: str = ""):
        """``VGRefineConfig``: ``base`` with this candidate's knobs and the top-``k`` heads of ``ranking``."""
        from .vgrefine.config import VGRefineConfig

        d = base.to_dict()
        d.update(masked_layers=list(self.masked_layers), sensitive_heads=[list(x) for x in ranking[:self.k]],
                 percentile=self.percentile, magnitude_threshold=self.magnitude_threshold,
                 generic_norm=self.generic_norm, knockout_heads=self.knockout_heads, triage_source="heads",
                 knockout_set="triage")
        if notes:
            d["notes"] = notes
        d.pop("faithful", None)
        cfg = VGRefineConfig.from_dict(d)
        cfg.faithful = base.faithful
        return cfg


@dataclass
class SearchSpace:
    """What :func:`search_knockout` tries.

    ``strategy="staged"`` (default, coordinate search): stage 1 scans masked layer(s) x thresholds at the
    base config's ``k``, normalisation and knockout heads; stage 2 scans ``ks`` x ``generic_norms`` x
    ``knockout_heads`` at the ``stage2_top`` best (layers, threshold) pairs of stage 1. ``"grid"``: the full
    product (can be large: the report states the count).
    """

    layer_runs: Sequence | None = None          # explicit tuples of layers; None: singles + runs <= max_run
    max_run: int = 2
    ks: Sequence[int] = (1, 2, 4, 8, 16)
    percentiles: Sequence[float] = (50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0)
    magnitude_thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.5)
    generic_norms: Sequence[str] = ("layer_mean", "per_head", "none")
    knockout_heads: Sequence[str] = ("all", "sensitive")
    strategy: str = "staged"
    stage2_top: int = 3

    def __post_init__(self):
        if self.strategy not in ("staged", "grid"):
            raise ValueError(f"SearchSpace.strategy must be 'staged' or 'grid', got {self.strategy!r}")
        bad = [p for p in self.percentiles if not 0.0 <= float(p) <= 100.0]
        if bad:
            raise ValueError(f"percentiles must lie in [0, 100], got {bad}")
        bad = [t for t in self.magnitude_thresholds if not 0.0 <= float(t) <= 1.0]
        if bad:
            raise ValueError(f"magnitude_thresholds must lie in [0, 1], got {bad}")
        for name, allowed in (("generic_norms", ("layer_mean", "per_head", "none")),
                              ("knockout_heads", ("all", "sensitive"))):
            wrong = [v for v in getattr(self, name) if v not in allowed]
            if wrong:
                raise ValueError(f"SearchSpace.{name} has {wrong}; allowed {allowed}")
        if not self.percentiles and not self.magnitude_thresholds:
            raise ValueError("give at least one percentile or magnitude threshold")
        if int(self.max_run) < 1 or any(int(k) < 1 for k in self.ks):
            raise ValueError("max_run and every k must be >= 1")

    @classmethod
    def coerce(cls, search) -> "SearchSpace":
        if search is True or search is None:
            return cls()
        if isinstance(search, cls):
            return search
        if isinstance(search, dict):
            return cls(**search)
        raise TypeError(f"search must be True, a dict of SearchSpace fields or a SearchSpace, got {type(search).__name__}")

    def layer_sets(self, num_layers: int, attention_layers=None) -> list[tuple]:
        """Masked-layer sets to try: ``layer_runs``, else every run of up to ``max_run`` consecutive layers — of
        the softmax-attention layers ``attention_layers`` when given (hybrid models: consecutive in that list)."""
        attn = list(range(num_layers)) if attention_layers is None else [int(x) for x in attention_layers]
        if self.layer_runs is not None:
            out = [tuple(sorted(int(x) for x in run)) for run in self.layer_runs]
            bad = [r for r in out if not r or any(not 0 <= x < num_layers for x in r)]
            if bad:
                raise ValueError(f"layer_runs {bad} do not fit a model with {num_layers} layers")
            lin = [r for r in out if any(x not in attn for x in r)]
            if lin:
                raise ValueError(f"layer_runs {lin} hold linear-attention layers of this hybrid model; its "
                                 f"softmax-attention layers are {attn}")
            return list(dict.fromkeys(out))
        return [tuple(attn[a:a + n]) for n in range(1, int(self.max_run) + 1) for a in range(len(attn) - n + 1)]

    def thresholds(self) -> list[tuple]:
        return [(float(p), None) for p in self.percentiles] + [(None, float(t)) for t in self.magnitude_thresholds]


@dataclass(frozen=True)
class TriageKnobs:
    """The settings :func:`~hf_vgrefine.vgrefine.triage.triage_scores` and
    :func:`~hf_vgrefine.vgrefine.triage.knockout_set` read, for one candidate: triage by ``sensitive_heads``
    in fp32, ``eps`` zero-division rule."""

    sensitive_heads: tuple
    generic_norm: str
    eps: float
    percentile: float | None = None
    magnitude_threshold: float | None = None
    triage_source: str = "heads"
    attention_dtype: str = "float32"
    zero_division: str = "eps"


# ============================================================================================ diagnostics
def distractor_mask(example) -> np.ndarray | None:
    """Pixel mask of the lesions *outside* the named structure of a reference-task example
    (:mod:`hf_vgrefine.reference_task`: ``lesions`` = ``(x, y, r, depth)``, ``lesion_labels`` = host
    structure, ``label`` = named structure, ``lesion_mask``); ``None`` when the example has no such fields.
    An explicit ``example["distractor_mask"]`` wins."""
    if example.get("distractor_mask") is not None:
        return np.asarray(example["distractor_mask"]) > 0
    if "lesions" not in example or "lesion_labels" not in example or example.get("lesion_mask") is None:
        return None
    lm = np.asarray(example["lesion_mask"]) > 0
    H, W = lm.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.zeros((H, W), dtype=bool)
    for (x, y, r, _), host in zip(example["lesions"], example["lesion_labels"]):
        if host != example.get("label"):
            out |= np.hypot(xx - x, yy - y) <= r + 2.0
    return out & lm


def token_masks(adapter, processor, example):
    """(region token mask or None, distractor-only token mask or None) of one example, bool ``[N]``."""
    from .geometry import boxes_to_token_mask, mask_to_token_mask

    grid = adapter.token_grid(processor, example["image"].size)
    region = None
    if example.get("boxes"):
        region = boxes_to_token_mask(example["boxes"], grid, box_format="xywh", mode="any", on_empty="empty")
    dm = distractor_mask(example)
    distr = None
    if dm is not None:
        distr = mask_to_token_mask(dm, grid, mode="any", on_empty="empty")
        if region is not None:
            distr = distr & ~region
    return region, distr


# ============================================================================================ statistics
def paired_bootstrap(diffs: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """95 % paired bootstrap CIs of the mean of each row of ``diffs`` ``[C, n]`` (per-example differences,
    e.g. correct(candidate) − correct(baseline)); the same resamples for every row. Returns (low, high, se)
    with ``se`` the bootstrap standard error."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[None]
    n = d.shape[1]
    if n == 0:
        nan = np.full(d.shape[0], np.nan)
        return nan, nan, nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1.0)
    boots = d @ w.T / n                                   # [C, n_boot]
    return np.percentile(boots, 2.5, axis=1), np.percentile(boots, 97.5, axis=1), boots.std(1, ddof=1)


# ============================================================================================ model passes
# ============================================================================================ the search
@dataclass
class SearchResult:
    """Outcome of :func:`search_knockout`: the chosen ``config``, every candidate's row (``table``), the
    baseline accuracy on the calibration split and the settings of the search."""

    config: object
    chosen: dict
    table: list
    baseline: dict
    info: dict
    files: dict = field(default_factory=dict)
    per_example: dict = field(default_factory=dict)   # "baseline" / candidate label -> correct per question
    ids: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "baseline": self.baseline, "info": self.info, "table": self.table,
                "config": self.config.to_dict(), "files": self.files, "ids": self.ids,
                "per_example": {k: [int(x) for x in v] for k, v in self.per_example.items()}}


def head_ranking_from_config(config) -> list:
    """Every ``(layer, head)`` best first, from a :func:`calibrate` config (its stored head statistic matrix);
    falls back to ``config.sensitive_heads`` when the matrix is absent."""
    from .calibrate import RANK_RULES, rank_heads

    cal = config.calibration or {}
    hs = cal.get("head_statistic") or {}
    if hs.get("matrix") is not None and cal.get("layers") is not None:
        desc = RANK_RULES.get(cal.get("rank_by", "ar_mean"), (None, None, True))[2]
        ranked = rank_heads(np.asarray(hs["matrix"], dtype=np.float64), cal["layers"], cal["heads"], desc,
                            cal.get("exclude_layers", ()))
        return [[l, h] for l, h, _ in ranked]
    return [list(x) for x in config.sensitive_heads]


def _select_rows(dataset, split_group):
    """Rows of ``dataset`` (list of dicts or a ``datasets.Dataset``) with ``split_group`` (only the
    ``split_group`` column is read to decide); every row when ``split_group`` is None or absent."""
    cols = getattr(dataset, "column_names", None)
    if split_group is None:
        return [dataset[i] for i in range(len(dataset))]
    if cols is not None:
        if "split_group" not in cols:
            return [dataset[i] for i in range(len(dataset))]
        groups = dataset["split_group"]
        return [dataset[i] for i, g in enumerate(groups) if g == split_group]
    return [row for row in dataset if row.get("split_group", split_group) == split_group]


def search_knockout(model, processor, dataset, base_config, space=None, head_ranking=None, split_group="calibration",
                    choices: Sequence[str] | None = None, batch_size: int = 16, n_boot: int = 1000, seed: int = 0,
                    output_dir: str | None = None, progress: bool = True, self_check: bool = True) -> SearchResult:
    """Search VGRefine's knockout settings for ``model`` on a labelled calibration split (accuracy gain).

    Args:
        dataset: closed questions with answers: rows with ``image`` (PIL), ``question``, ``answer``; optional
            ``choices`` (per row), ``boxes`` (xywh, the question's region: kept-region diagnostic) and
            distractor fields (:func:`distractor_mask`). A ``datasets.Dataset`` or a list of dicts.
        base_config: the starting :class:`~hf_vgrefine.vgrefine.VGRefineConfig` (e.g. :func:`calibrate`'s):
            instruction, query, eps, generic prompt and the ``k``/normalisation/heads of stage 1 come from it.
        space: :class:`SearchSpace` (or a dict of its fields; default ``SearchSpace()``).
        head_ranking: ``(layer, head)`` pairs best first (default :func:`head_ranking_from_config`).
        split_group: only rows whose ``split_group`` equals it are used when rows have that field (other rows'
            content is never read); None uses every row.
        choices: answer choices of every question (default: per-row ``choices``, else the distinct answers).
        output_dir: writes ``vgrefine_config.json`` (the chosen config), ``search_report.md``,
            ``search_results.json`` and ``search_gain_vs_percentile.png``.
    Returns:
        :class:`SearchResult` (``.config`` is the chosen config; its ``calibration["search"]`` holds the summary).
    """
    import torch

    from .adapters import get_adapter
    from .attention import AttentionProbe, capture_image_attention
    from .prompts import build_inputs, generic_inputs, to_model_inputs
    from .vgrefine.triage import knockout_set, triage_scores

    t_all = time.perf_counter()
    space = SearchSpace.coerce(space)
    adapter = get_adapter(model)
    L, H = adapter.num_layers, adapter.num_heads
    all_layers = list(adapter.attention_layers)   # the capture below keeps every (softmax-attention) layer
    base = base_config
    base.check_model(L, H, all_layers)
    if base.query != "last":
        raise ValueError("the search supports query='last' (the released triage row) only")
    ranking = [list(map(int, x)) for x in (head_ranking if head_ranking is not None else head_ranking_from_config(base))]
    if not ranking:
        raise ValueError("no head ranking: pass head_ranking= or a base config from hf_vgrefine.calibrate")
    examples = _select_rows(dataset, split_group)
    if not examples:
        raise ValueError(f"no calibration rows (split_group={split_group!r})")
    for i, e in enumerate(examples):
        for key in ("image", "question", "answer"):
            if e.get(key) is None:
                raise ValueError(f"calibration row {i} has no {key!r}: the search needs closed questions with answers")
    global_choices = list(choices) if choices is not None else sorted({str(e["answer"]) for e in examples})
    if choices is None and any(e.get("choices") is None for e in examples) and len(global_choices) > 10:
        raise ValueError(f"{len(global_choices)} distinct answers and no per-row 'choices': the search needs closed "
                         "questions (give choices= or a 'choices' field)")

    # ------------------------------------------------------------------ candidates
    layer_sets = space.layer_sets(L, all_layers)
    thresholds = space.thresholds()
    base_k = len(base.sensitive_heads) or 1
    base_thr = (float(base.percentile), None) if base.percentile is not None else (None, float(base.magnitude_threshold))
    ks = sorted({min(int(k), len(ranking)) for k in space.ks} | {min(base_k, len(ranking))})

    def cand(layers, k, thr, norm, heads):
        return Candidate(tuple(layers), int(k), thr[0], thr[1], norm, heads)

    base_cand = cand(base.masked_layers, min(base_k, len(ranking)), base_thr, base.generic_norm, base.knockout_heads)
    if space.strategy == "grid":
        stages = [[cand(l, k, t, n, h) for l in layer_sets for k in ks for t in thresholds
                   for n in space.generic_norms for h in space.knockout_heads]]
    else:
        stages = [[cand(l, base_cand.k, t, base.generic_norm, base.knockout_heads) for l in layer_sets for t in thresholds]]

    # ------------------------------------------------------------------ per-batch preparation
    n = len(examples)
    tok = getattr(processor, "tokenizer", processor)
    from .prompts import format_question

    # rows with equally long questions end their image at the same position: batching them together keeps one
    # unit (one tail forward per candidate) per batch
    q_len = [len(tok(format_question(e["question"], base.instruction), add_special_tokens=False)["input_ids"])
             for e in examples]
    order = sorted(range(n), key=lambda i: (q_len[i], i))
    answers = [normalise_answer(e["answer"]) for e in examples]
    row_choices = [list(e["choices"]) if e.get("choices") is not None else global_choices for e in examples]
    for i, (a, ch) in enumerate(zip(answers, row_choices)):
        if a not in {normalise_answer(c) for c in ch}:
            raise ValueError(f"calibration row {i}: answer {examples[i]['answer']!r} is not one of its choices {ch}")
    choice_ids = {}
    diag_region, diag_distr = [], []
    for e in examples:
        r, d = token_masks(adapter, processor, e)
        diag_region.append(r)
        diag_distr.append(d)

    def predict(logits, rows_global):
        out = []
        for j, i in enumerate(rows_global):
            ch = tuple(row_choices[i])
            if ch not in choice_ids:
                choice_ids[ch] = answer_ids(processor, ch)
            ids = choice_ids[ch]
            out.append(normalise_answer(ch[int(torch.argmax(logits[j, ids]))]) == answers[i])
        return out

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="search: capture", unit="ex", leave=False)
    batches = []
    baseline = np.zeros(n, dtype=bool)
    timings = {"capture_s": 0.0, "prefix_s": 0.0, "candidates_s": 0.0}
    # prefix-LM models (PaliGemma): the image keys depend on the question text, a cached image prefix is not exact;
    # hybrid models (Qwen 3.5): the linear-attention layers' cache is a running state, not per-token keys/values;
    # sparse attention (DSA): the indexer keeps its own key cache; short convolutions: their state (prefix_paths_exact)
    check = {"done": False, "max_abs_diff": None, "fallback": bool(adapter.prefix_lm or not adapter.prefix_paths_exact)}
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = [examples[i] for i in idx]
        t0 = time.perf_counter()
        inputs = to_model_inputs(build_inputs(processor, [e["image"] for e in batch], [e["question"] for e in batch],
                                              instruction=base.instruction), model)
        spans = adapter.image_spans(inputs)
        for b, sp in enumerate(spans):
            if len([s for s in sp if s.block in ("grid", "base")]) != 1:
                raise ValueError(f"calibration row {idx[b]} has several images; VGRefine supports one per prompt")
        q = capture_image_attention(model, inputs, layers=None, query="last", spans=spans, adapter=adapter)
        g = None
        if any(nm != "none" for nm in set(space.generic_norms) | {base.generic_norm}):
            g_in = to_model_inputs(generic_inputs(processor, [e["image"] for e in batch], instruction=base.instruction,
                                                  generic_question=base.generic_prompt), model)
            g = capture_image_attention(model, g_in, layers=None, query="last", adapter=adapter).maps
        timings["capture_s"] += time.perf_counter() - t0
        ntok = set(q.n_tokens)
        if len(ntok) != 1:
            raise ValueError("the search needs the same number of image tokens for every calibration image "
                             f"(got {sorted(ntok)}); resize the images to one size")
        batches.append({"idx": idx, "inputs": inputs, "spans": spans, "q": q.maps, "g": g})
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()

    # ------------------------------------------------------------------ evaluation of a list of candidates
    results: dict = {}   # Candidate -> dict(correct=bool[n], kept=..., ...)

    def evaluate(cands: list):
        todo = [c for c in cands if c not in results]
        if not todo:
            return
        correct = {c: np.zeros(n, dtype=bool) for c in todo}
        kept = {c: np.zeros(n) for c in todo}
        kept_region = {c: np.full(n, np.nan) for c in todo}
        kept_distr = {c: np.full(n, np.nan) for c in todo}
        pbar = None
        if progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(batches) * len(todo), desc=f"search: {len(todo)} candidates", leave=False)
        outer = AttentionProbe(model, adapter=adapter)   # keeps the attention function set between candidates
        outer.__enter__()
        try:
            _evaluate_batches(todo, correct, kept, kept_region, kept_distr, pbar)
        finally:
            outer.__exit__(None, None, None)
        if pbar is not None:
            pbar.close()
        for c in todo:
            results[c] = {"correct": correct[c], "kept_fraction": kept[c], "kept_in_region": kept_region[c],
                          "kept_distractor": kept_distr[c]}

    def _evaluate_batches(todo, correct, kept, kept_region, kept_distr, pbar):
        n_forwards = 0
        for bt in batches:
            t0 = time.perf_counter()
            units = prefix_units(model, adapter, bt["inputs"], bt["spans"], cache=not check["fallback"])
            timings["prefix_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            glob = bt["idx"]
            for u in units:
                rows_g = [glob[r] for r in u.rows]
                if bt.get("baseline_done") is None:
                    full = rows_inputs(adapter, bt["inputs"], u.rows) if check["fallback"] else None
                    logits = knockout_logits(model, adapter, u, None, (), None, full_inputs=full)
                    baseline[rows_g] = predict(logits, rows_g)
            bt["baseline_done"] = True
            score_memo, mask_memo, fwd_memo = {}, {}, {}
            for c in todo:
                heads_sel = [tuple(x) for x in ranking[:c.k]]
                key_s = (tuple(heads_sel), c.generic_norm)
                knobs = TriageKnobs(tuple(heads_sel), c.generic_norm, base.eps, c.percentile, c.magnitude_threshold)
                if key_s not in score_memo:
                    if not heads_sel:
                        raise ValueError("no sensitive heads")
                    score_memo[key_s] = triage_scores(bt["q"], bt["g"], all_layers, knobs)
                key_m = key_s + (c.percentile, c.magnitude_threshold)
                if key_m not in mask_memo:
                    mask_memo[key_m] = knockout_set(score_memo[key_s], knobs)[0]
                K = mask_memo[key_m]                                    # [B, N]
                kn = K.cpu().numpy()
                for b, i in enumerate(glob):
                    kept[c][i] = 1.0 - kn[b].mean()
                    if diag_region[i] is not None and diag_region[i].any():
                        kept_region[c][i] = 1.0 - kn[b][diag_region[i]].mean()
                    if diag_distr[i] is not None and diag_distr[i].any():
                        kept_distr[c][i] = 1.0 - kn[b][diag_distr[i]].mean()
                if c.knockout_heads == "all":
                    heads_map = None
                else:
                    heads_map = {}
                    for l, h in heads_sel:
                        heads_map.setdefault(l, []).append(h)
                    if not any(l in heads_map for l in c.masked_layers):     # no knockout at all: the baseline
                        for b, i in enumerate(glob):
                            correct[c][i] = baseline[i]
                        if pbar is not None:
                            pbar.update(1)
                        continue
                    if all(len(set(heads_map.get(l, ()))) == H for l in c.masked_layers):
                        heads_map = None                                 # every head of every masked layer: = all
                hkey = None if heads_map is None else tuple(sorted((l, tuple(sorted(v))) for l, v in heads_map.items()
                                                                   if l in c.masked_layers))
                fkey = (c.masked_layers, hkey, kn.tobytes())
                if fkey not in fwd_memo:
                    preds = {}
                    for u in units:
                        rows_g = [glob[r] for r in u.rows]
                        ko = K[u.rows]
                        hm = None if heads_map is None else {l: tuple(v) for l, v in heads_map.items()}
                        if check["fallback"]:
                            logits = knockout_logits(model, adapter, u, ko, c.masked_layers, hm,
                                                      full_inputs=rows_inputs(adapter, bt["inputs"], u.rows))
                        else:
                            logits = knockout_logits(model, adapter, u, ko, c.masked_layers, hm)
                            if self_check and not check["done"]:
                                full = knockout_logits(model, adapter, u, ko, c.masked_layers, hm,
                                                        full_inputs=rows_inputs(adapter, bt["inputs"], u.rows))
                                diff = float((full - logits).abs().max())
                                scale = float(full.abs().max()) or 1.0
                                check.update(done=True, max_abs_diff=diff)
                                if diff > 1e-3 * scale:
                                    import warnings

                                    warnings.warn(f"search: the cached-prefix logits differ from a full forward by "
                                                  f"{diff:.3g}; falling back to full forwards (slower)", stacklevel=2)
                                    check["fallback"] = True
                                    logits = full
                        n_forwards += 1
                        for r, ok in zip(rows_g, predict(logits, rows_g)):
                            preds[r] = ok
                    fwd_memo[fkey] = preds
                for i, ok in fwd_memo[fkey].items():
                    correct[c][i] = ok
                if pbar is not None:
                    pbar.update(1)
            timings["candidates_s"] += time.perf_counter() - t0
            for u in units:
                u.kv = None
        timings["forwards"] = timings.get("forwards", 0) + n_forwards

    evaluate(stages[0] + [base_cand])
    if space.strategy == "staged":
        gain1 = sorted(stages[0], key=lambda c: (-results[c]["correct"].mean(), _complexity(c, base_cand)))
        top = []
        for c in gain1:
            if (c.masked_layers, c.percentile, c.magnitude_threshold) not in top:
                top.append((c.masked_layers, c.percentile, c.magnitude_threshold))
            if len(top) >= int(space.stage2_top):
                break
        stage2 = [cand(l, k, (p, m), nm, h) for l, p, m in top for k in ks for nm in space.generic_norms
                  for h in space.knockout_heads]
        stages.append(stage2)
        evaluate(stage2)

    # ------------------------------------------------------------------ statistics and choice
    cands = list(dict.fromkeys([c for st in stages for c in st] + [base_cand]))
    D = np.stack([results[c]["correct"].astype(float) - baseline.astype(float) for c in cands])
    lo, hi, _ = paired_bootstrap(D, n_boot=n_boot, seed=seed)
    gains = D.mean(1)
    best = int(np.argmax(gains))
    dlo, dhi, dse = paired_bootstrap(D[best][None] - D, n_boot=n_boot, seed=seed + 1)
    # one-standard-error rule: within noise of the best = gain >= best gain - SE(best - candidate), paired
    within = [i for i in range(len(cands)) if gains[i] >= gains[best] - dse[i] - 1e-12]
    chosen_i = min(within, key=lambda i: (_complexity(cands[i], base_cand), -gains[i]))
    base_acc = float(baseline.mean())

    def mean_or_none(v):
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else None

    table = []
    for i, c in enumerate(cands):
        r = results[c]
        table.append({
            "label": c.label, "masked_layers": list(c.masked_layers), "k": c.k, "percentile": c.percentile,
            "magnitude_threshold": c.magnitude_threshold, "generic_norm": c.generic_norm,
            "knockout_heads": c.knockout_heads, "stage": next(s + 1 for s, st in enumerate(stages) if c in st)
            if any(c in st for st in stages) else 0,
            "accuracy": float(r["correct"].mean()), "gain": float(gains[i]), "gain_ci": [float(lo[i]), float(hi[i])],
            "diff_to_best_ci": [float(dlo[i]), float(dhi[i])], "diff_to_best_se": float(dse[i]),
            "within_noise_of_best": i in within,
            "changes_from_base": _complexity(c, base_cand)[0],
            "kept_fraction": mean_or_none(r["kept_fraction"]), "kept_in_region": mean_or_none(r["kept_in_region"]),
            "kept_distractor": mean_or_none(r["kept_distractor"]),
            "is_base": c == base_cand, "is_best": i == best, "is_chosen": i == chosen_i,
        })
    chosen = dict(table[chosen_i])
    n_distinct = len(cands)
    rule = ("best = highest calibration gain; within noise of the best = gain >= best gain - one paired bootstrap "
            "standard error of the difference to the best (one-standard-error rule); chosen = among those, the one "
            "with the fewest knobs changed from the base config, then fewer masked layers, fewer heads, higher gain")
    info = {
        "n_calibration": n, "n_candidates": n_distinct, "n_per_candidate_ratio": round(n / max(n_distinct, 1), 3),
        "strategy": space.strategy, "space": {k_: (list(v) if isinstance(v, (list, tuple)) else v)
                                              for k_, v in asdict(space).items()},
        "layer_sets": [list(x) for x in layer_sets], "head_ranking": ranking, "choices": global_choices,
        "split_group": split_group, "rule": rule, "n_boot": n_boot, "seed": seed,
        "base": {"label": base_cand.label, "gain": float(gains[cands.index(base_cand)])},
        "best": {"label": cands[best].label, "gain": float(gains[best]), "gain_ci": [float(lo[best]), float(hi[best])]},
        "se_of_a_gain": float(np.sqrt(D[best].var() / n)) if n > 1 else None,
        "self_check": check, "timings_s": {k_: round(v, 2) for k_, v in timings.items()},
        "total_s": round(time.perf_counter() - t_all, 2),
        "n_with_region": int(sum(r is not None and r.any() for r in diag_region)),
        "n_with_distractors": int(sum(d is not None and d.any() for d in diag_distr)),
    }
    baseline_block = {"accuracy": base_acc, "n": n}
    summary = {"chosen": chosen["label"], "gain": chosen["gain"], "gain_ci": chosen["gain_ci"],
               "baseline_accuracy": base_acc, "accuracy": chosen["accuracy"], "n_calibration": n,
               "n_candidates": n_distinct, "best": info["best"], "rule": rule, "report": REPORT_MD}
    c = cands[chosen_i]
    cfg = c.to_config(base, ranking, notes=f"tuned by hf_vgrefine.tuning.search_knockout on {n} calibration questions: "
                                           f"{c.label}, calibration gain {chosen['gain']:+.4f}")
    cfg.calibration = dict(base.calibration or {}, search=summary)
    cfg.check_model(L, H, all_layers)
    per_example = {"baseline": baseline.tolist(), **{c_.label: results[c_]["correct"].tolist() for c_ in cands}}
    result = SearchResult(config=cfg, chosen=chosen, table=table, baseline=baseline_block, info=info,
                          per_example=per_example, ids=[str(e.get("id", i)) for i, e in enumerate(examples)])
    if output_dir is not None:
        result.files = write_report(result, output_dir)
    return result


def _complexity(c: Candidate, base: Candidate) -> tuple:
    """Simplicity key (smaller = simpler): knobs changed from the base config, masked layers, heads."""
    changed = sum([c.masked_layers != base.masked_layers, c.k != base.k,
                   (c.percentile, c.magnitude_threshold) != (base.percentile, base.magnitude_threshold),
                   c.generic_norm != base.generic_norm, c.knockout_heads != base.knockout_heads])
    return (changed, len(c.masked_layers), c.k)


