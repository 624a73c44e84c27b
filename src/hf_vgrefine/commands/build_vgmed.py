"""``hf-vgrefine build-vgmed``: build one VGMED configuration as parquet + dataset card."""

from __future__ import annotations

import argparse
import sys

from ..data.schema import CONFIG_DESCRIPTIONS, CONFIG_NAMES, DEFAULT_CONFIG

_EPILOG = """\
configurations:
  atlas  offline: Colin27 T1 slices + AAL masks (Debian mricron-data) and pydicom's liver-lesion MR (default)
  slake  released SLAKE question files + SLAKE images (CC BY 4.0)
  full   released 8-modality VGMED files + their source images/masks in --data-dir (partly CC BY-NC-SA 4.0)
  coco   released COCO question files + COCO val2014 images in --data-dir/val2014 (never pushed)

after a build, from any directory and offline (HF_HUB_OFFLINE=1):
  datasets.load_dataset("vgmed", NAME)     # pre-filled datasets cache
  datasets.load_dataset("vgmed")           # default configuration (atlas, when built)
  datasets.load_dataset(OUT_DIR, NAME)     # the parquet + README folder

exit codes: 0 ok, 1 missing/corrupt source (the message names the file and how to get it), 2 usage.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", choices=CONFIG_NAMES, default=DEFAULT_CONFIG, metavar="NAME",
        help=f"configuration to build: {', '.join(CONFIG_NAMES)} (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", default=None,
        help="folder with local copies of the sources. atlas: a folder holding ch2.nii.gz, aal.nii.gz and aal.nii.txt "
             "(default /usr/share/mricron/templates); slake: the SLAKE question jsonl files + imgs/ or imgs.zip; "
             "full: VGMED_localization.jsonl, VGMED_attribute.jsonl and the images/masks at their relative paths; "
             "coco: the COCO question jsonl files, val2014/ and optionally annotations/instances_val2014.json",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None,
        help="dataset folder to write README.md + data/NAME/test-*.parquet into; other configurations already in it "
             "are kept (default: $HF_VGREFINE_VGMED_DIR or $HF_HOME/hf_vgrefine/vgmed)",
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO", default=None,
        help="after building, upload data/NAME/ and a merged dataset card to the Hub dataset repo REPO "
             "(needs network and a token; refused for coco)",
    )
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    parser.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="datasets cache to pre-fill (default: HF_DATASETS_CACHE, i.e. $HF_HOME/datasets)",
    )
    parser.add_argument(
        "--no-cache", dest="prefill_cache", action="store_false", default=None,
        help="do not pre-fill the datasets cache (then load_dataset('vgmed', NAME) will not resolve offline)",
    )
    parser.add_argument(
        "--max-samples", type=_positive_int, metavar="N", default=None,
        help="keep only the first N targets (2 rows each) for a quick trial; implies --no-cache",
    )
    parser.add_argument(
        "--no-download", dest="download", action="store_false",
        help="never download sources; fail with instructions when a local copy is missing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into an --out folder that holds files build-vgmed did not write (refused otherwise); "
             "those files are kept, never deleted",
    )
    parser.set_defaults(func=run)
    return parser


def add_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build-vgmed",
        help="build a VGMED configuration as parquet + dataset card",
        description="Build one VGMED configuration: parquet shards + README dataset card (so load_dataset(OUT) "
                    "works), and pre-fill the datasets cache so load_dataset('vgmed', NAME) works offline from any "
                    "directory. Output is staged and renamed into place at the end; rebuilding is idempotent.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return _configure(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.build import build_vgmed, cached_path
    from ..data.sources import VGMEDSourceError

    try:
        root = build_vgmed(
            args.config,
            args.out,
            data_dir=args.data_dir,
            push_to_hub=args.push_to_hub,
            prefill_cache=args.prefill_cache,
            cache_dir=args.cache_dir,
            max_samples=args.max_samples,
            download=args.download,
            progress=not args.quiet,
            private=args.private or None,
            overwrite=args.overwrite,
        )
    except VGMEDSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"VGMED `{args.config}` written to {root}")
    print(f"  load_dataset({str(root)!r}, {args.config!r}, split='test')")
    if cached_path(args.config, args.cache_dir) is not None and args.max_samples is None and args.prefill_cache is not False:
        print(f"  load_dataset('vgmed', {args.config!r}, split='test')   # offline, any directory")
    if args.push_to_hub:
        print(f"  pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (used by ``dataset_script/vgmed/build.py``)."""
    parser = _configure(argparse.ArgumentParser(
        prog="build-vgmed", description=__doc__, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


__all__ = ["add_cli", "main", "run", "CONFIG_DESCRIPTIONS"]
