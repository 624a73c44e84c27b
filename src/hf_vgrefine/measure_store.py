"""Run folder of a resumable grounding measurement.

Layout of ``output_dir``: ``run.json`` (the settings of the measurement), ``shards/rank<r>-<seq>.parquet``
(one :class:`~hf_vgrefine.results.GroundingResults` table per processed batch and process, written
atomically), and, once merged by the main process, ``per_sample.parquet``, ``summary.json``,
``layers.png`` (and ``skipped.json`` when rows were skipped). A rerun skips the ids already in the shards;
a rerun with other settings is refused while shards exist.
"""

from __future__ import annotations

import json
import os

from .jsonio import json_safe, write_json
from .results import GroundingResults
from .sharding import settings_diff

__all__ = ["MeasureFolder", "RUN_FILE", "SHARD_DIR", "SKIPPED_FILE"]

RUN_FILE = "run.json"
SHARD_DIR = "shards"
SKIPPED_FILE = "skipped.json"


class MeasureFolder:
    """The shards and settings of one measurement in ``path`` (shards written by process ``rank``)."""

    def __init__(self, path: str, rank: int = 0):
        self.path = path
        self.rank = int(rank)
        self._seq = len([p for p in self.shards() if os.path.basename(p).startswith(self._prefix())])

    def _prefix(self) -> str:
        return f"rank{self.rank:03d}-"

    def shards(self) -> list[str]:
        """Paths of every process's shard files, sorted."""
        d = os.path.join(self.path, SHARD_DIR)
        if not os.path.isdir(d):
            return []
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith("."))

    def done_ids(self) -> set:
        """Sample ids already measured (in any shard)."""
        import pyarrow.parquet as pq

        done = set()
        for p in self.shards():
            done.update(str(x) for x in pq.read_table(p, columns=["id"]).column("id").to_pylist())
        return done

    def check_settings(self, settings: dict, is_main: bool) -> None:
        """On the main process: refuse a folder holding shards measured with other ``settings``, then
        record ``settings`` in ``run.json`` (``ValueError`` naming the differing settings)."""
        if not is_main:
            return
        path = os.path.join(self.path, RUN_FILE)
        os.makedirs(os.path.join(self.path, SHARD_DIR), exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            new = json_safe(settings)
            diff = settings_diff(old, new, keys=new)
            if diff and self.shards():
                raise ValueError(f"{self.path} holds a measurement with different settings {diff}; use a new "
                                 "output directory (or delete it) to measure with these settings")
        write_json(path, settings)

    def write_shard(self, part: GroundingResults) -> str:
        """Write one batch's results as this process's next shard."""
        self._seq += 1
        return part.to_parquet(os.path.join(self.path, SHARD_DIR, f"{self._prefix()}{self._seq:06d}.parquet"))

    def merged(self, settings: dict) -> GroundingResults | None:
        """Every shard's samples in dataset order with ``settings`` as info (None without shards)."""
        paths = self.shards()
        if not paths:
            return None
        res = GroundingResults.concat([GroundingResults.from_parquet(p) for p in paths]).sort_by_index()
        res.info = dict(settings)
        return res

    def write_skipped(self, skipped: list) -> None:
        write_json(os.path.join(self.path, SKIPPED_FILE), skipped)
