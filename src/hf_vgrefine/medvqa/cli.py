"""Module entry of ``hf-vgrefine evaluate`` for ``accelerate launch`` (the command lives in
:mod:`hf_vgrefine.commands.evaluate`)::

    accelerate launch --num_processes 2 -m hf_vgrefine.medvqa.cli --model ID --benchmarks bundle --out DIR
"""

from __future__ import annotations

import sys

from ..commands.evaluate import add_cli, default_vgrefine_config, main, run

__all__ = ["add_cli", "default_vgrefine_config", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
