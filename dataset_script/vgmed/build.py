#!/usr/bin/env python
"""Build VGMED with the installed package (datasets 5.x runs no loading scripts; the builder lives in
``hf_vgrefine.data``). Same options as ``hf-vgrefine build-vgmed``:

    python dataset_script/vgmed/build.py --config atlas --out /tmp/vgmed
    python dataset_script/vgmed/build.py --config slake --data-dir ~/data/slake --out /tmp/vgmed

The README.md next to this file is the dataset card template (regenerate it with ``--write-card``).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    if sys.argv[1:] == ["--write-card"]:
        from hf_vgrefine.data import render_card

        (Path(__file__).resolve().parent / "README.md").write_text(render_card(), encoding="utf-8")
        sys.exit(0)
    from hf_vgrefine.commands.build_vgmed import main

    sys.exit(main())
