"""Command-line entry point ``hf-vgrefine``.

Each sub-command is a module of :mod:`hf_vgrefine.commands` exposing ``add_cli(subparsers)``, which
registers its parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning
an exit code). Modules are imported only when their command runs, so ``hf-vgrefine --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (command name, implementing module, one-line help). Order = order in --help.
COMMANDS: list[tuple[str, str, str]] = [
    ("setup", "hf_vgrefine.commands.setup", "post-install: put the grounding_ratio metric and VGMED atlas into the HF cache"),
    ("demo", "hf_vgrefine.commands.demo", "offline end-to-end run on the embedded default (build, measure, calibrate, refine, report)"),
    ("capture", "hf_vgrefine.commands.capture", "per-layer last-token attention of a model to an image (where does it look?)"),
    ("build-vgmed", "hf_vgrefine.commands.build_vgmed", "build a VGMED configuration as parquet + dataset card"),
    ("measure", "hf_vgrefine.commands.measure", "measure attention-vs-region grounding per layer (and head)"),
    ("calibrate", "hf_vgrefine.commands.calibrate", "choose VGRefine's masked layer and sensitive heads from grounding scores"),
    ("install-metric", "hf_vgrefine.commands.install_metric", "install the grounding_ratio evaluate module so evaluate.load('grounding_ratio') works offline"),
    ("evaluate", "hf_vgrefine.commands.evaluate", "Med-VQA closed-ended evaluation, baseline vs VGRefine"),
]


def _available_commands():
    for name, module, help_ in COMMANDS:
        spec = importlib.util.find_spec(module) if _parent_importable(module) else None
        if spec is not None:
            yield name, module, help_


def _parent_importable(module: str) -> bool:
    parent = module.rpartition(".")[0]
    try:
        importlib.import_module(parent)
    except ImportError:
        return False
    return True


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Parser with every available command listed; only ``command``'s module is imported."""
    parser = argparse.ArgumentParser(
        prog="hf-vgrefine",
        description="Visual grounding for medical VLMs: measure where a model looks, calibrate and apply VGRefine.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in _available_commands():
        if name == command:
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if command is None else 2
    from .outdir import ForeignOutputError

    try:
        return int(args.func(args) or 0)
    except ForeignOutputError as e:   # a refused output folder is a usage error, not a crash
        print(f"hf-vgrefine {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
