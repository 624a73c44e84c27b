"""``hf-vgrefine install-metric``: the grounding_ratio evaluate module into evaluate's module cache."""

from __future__ import annotations

import argparse
import sys

from ..metrics_module import install_metric, installed_metric_dir


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hf-vgrefine install-metric``."""
    parser = subparsers.add_parser(
        "install-metric",
        help="install the grounding_ratio evaluate module so evaluate.load('grounding_ratio') works offline",
        description=(
            "Copy the grounding_ratio evaluate module shipped with hf_vgrefine into evaluate's module "
            "cache (<HF_MODULES_CACHE>/evaluate_modules/metrics/evaluate-metric--grounding_ratio/<hash>/), "
            "where evaluate.load('grounding_ratio') finds it offline (HF_HUB_OFFLINE=1) from any working "
            "directory. HF_MODULES_CACHE defaults to $HF_HOME/modules. Prints the installed script path."
        ),
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="evaluate's modules cache to install into (default: $HF_MODULES_CACHE, else $HF_HOME/modules, "
        "else ~/.cache/huggingface/modules)",
    )
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="only print where the module would be installed, write nothing",
    )
    parser.set_defaults(func=_run_cli)
    return parser


def _run_cli(args: argparse.Namespace) -> int:
    if args.print_only:
        print(installed_metric_dir(args.cache_dir))
        return 0
    try:
        path = install_metric(args.cache_dir)
    except OSError as err:
        print(f"install-metric: cannot write the module: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0
