"""The ``hf-vgrefine`` sub-commands, one module each (the dispatcher is :mod:`hf_vgrefine.cli`).

Every module exposes ``add_cli(subparsers)``, which registers its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code), and holds only argument parsing and
printing: the work is done by the library modules, which never import argparse.
"""
