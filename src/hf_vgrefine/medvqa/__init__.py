"""Med-VQA evaluation harness (``docs/medvqa.md``): loaders, the closed-ended MCQ protocol, scorers and a
resumable, data-parallel runner comparing the baseline with VGRefine.

Quick use::

    from hf_vgrefine.medvqa import load_benchmark, evaluate_medvqa
    items = load_benchmark("bundle")                       # HuatuoGPT-Vision evaluation file
    report = evaluate_medvqa(model, processor, items, methods=("baseline", "vgrefine"), out_dir="runs/x")

``evaluate`` is the deprecated former name of ``evaluate_medvqa`` (it shadowed the ``evaluate`` library).
    print(report.to_markdown())
"""

from __future__ import annotations

from .loaders import (
    BENCHMARKS,
    MMMU_MED_SUBJECTS,
    load_benchmark,
    load_bundle,
    mmmu_med,
    omnimedvqa,
    path_vqa,
    pmc_vqa,
    slake,
    vqa_rad,
)
from .protocol import (
    MCQ_INSTRUCTION,
    MCQ_TEMPLATE,
    MMMU_TEMPLATE,
    VGREFINE_INSTRUCTION,
    PreparedItems,
    build_mcq_prompt,
    extract_choice,
    ground_truth_letter,
    option_map,
    parse_options,
    prepare_items,
)
from .methods import Method, baseline_method, vgrefine_method
from .records import read_records
from .report import EvalReport, build_summary, compare, summary_markdown
from .runner import DECODING_PRESETS, evaluate, evaluate_medvqa, item_prompt
from .schema import CLOSED, OPEN, MedVQAItem, open_image
from .scorers import SCORERS, Score, get_scorer, score_open, token_recall
from .stats import mcnemar_exact, wilson_interval

__all__ = [
    "BENCHMARKS", "MMMU_MED_SUBJECTS", "load_benchmark", "load_bundle", "mmmu_med", "omnimedvqa", "path_vqa",
    "pmc_vqa", "slake", "vqa_rad",
    "MCQ_INSTRUCTION", "MCQ_TEMPLATE", "MMMU_TEMPLATE", "VGREFINE_INSTRUCTION", "PreparedItems", "build_mcq_prompt",
    "extract_choice", "ground_truth_letter", "option_map", "parse_options", "prepare_items",
    "DECODING_PRESETS", "EvalReport", "Method", "baseline_method", "build_summary", "compare", "evaluate_medvqa",
    "evaluate",
    "item_prompt", "read_records", "summary_markdown", "vgrefine_method",
    "CLOSED", "OPEN", "MedVQAItem", "open_image",
    "SCORERS", "Score", "get_scorer", "score_open", "token_recall", "mcnemar_exact", "wilson_interval",
]
