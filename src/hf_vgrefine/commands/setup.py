"""``hf-vgrefine setup``: the post-install step (see :func:`hf_vgrefine.setup_cmd.setup`)."""

from __future__ import annotations

import argparse
import sys

from ..setup_cmd import setup


def _run(args) -> int:
    from ..data.sources import VGMEDSourceError

    try:
        res = setup(quiet=args.quiet, build_atlas=not args.metric_only)
    except (OSError, VGMEDSourceError) as e:
        print(f"hf-vgrefine setup: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"grounding_ratio metric: {res['metric']}")
        if res["atlas"]:
            print(f"VGMED atlas ({'built' if res['built'] else 'already cached'}): {res['atlas']}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "setup", help="post-install: put the grounding_ratio metric and VGMED atlas into the HF cache",
        description="Post-install step (run by scripts/install.sh): install the grounding_ratio evaluate module and "
                    "build the offline VGMED atlas configuration into the Hugging Face cache ($HF_HOME), so that "
                    "evaluate.load('grounding_ratio'), load_dataset('vgmed', 'atlas') and load_dataset('vgmed') work "
                    "offline from any directory. Idempotent: a second run changes nothing.")
    p.add_argument("--quiet", action="store_true", help="print nothing unless something fails")
    p.add_argument("--metric-only", action="store_true", help="install the metric only (no VGMED build)")
    p.set_defaults(func=_run)
    return p
