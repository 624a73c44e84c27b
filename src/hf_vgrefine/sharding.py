"""Sharded, resumable runs: which process takes which items, and whether a run folder may be resumed.

Used by the grounding measurement (:mod:`hf_vgrefine.measure`) and the Med-VQA runner
(:mod:`hf_vgrefine.medvqa.runner`). Under ``accelerate launch`` process ``rank`` of ``world`` takes the
items ``i % world == rank`` that are not done yet; a plain ``python`` run is one process (rank 0 of 1) and
needs no accelerate configuration. A rerun into the same folder skips what is recorded there, and refuses
to mix results made with other settings (:func:`settings_diff`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["RunShard", "partial_state", "settings_diff", "env_flag"]


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1 / true / yes / on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def partial_state():
    """``accelerate.PartialState`` of this process (one process without ``accelerate launch``).

    ``ACCELERATE_USE_CPU=1`` selects CPU processes (gloo), needed for several CPU processes:
    ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m hf_vgrefine.cli evaluate …``.
    ``accelerate launch --cpu --num_processes N`` starts one process unless MPI is configured
    (``--mpirun_hostfile``); that case is reported with a ``RuntimeWarning``.
    """
    from accelerate import PartialState

    state = PartialState(cpu=env_flag("ACCELERATE_USE_CPU"))
    if (state.num_processes == 1 and env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR")
            and not os.environ.get("WORLD_SIZE")):
        warnings.warn("accelerate launch --cpu with several processes needs MPI (--mpirun_hostfile); running as ONE "
                      "process. For several CPU processes use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                      "--num_processes N -m hf_vgrefine.medvqa.cli ...", RuntimeWarning, stacklevel=3)
    return state


class RunShard:
    """This process's part of a data-parallel run.

    ``state``: an ``accelerate.PartialState`` (or anything with ``process_index``, ``num_processes``,
    ``wait_for_everyone()``), or ``None`` for a single process without accelerate."""

    def __init__(self, state=None):
        self.state = state
        self.rank = int(state.process_index) if state is not None else 0
        self.world = int(state.num_processes) if state is not None else 1

    @classmethod
    def current(cls, required: bool = False) -> "RunShard":
        """The shard of this process. Without accelerate (or when it cannot start) a single process,
        unless ``required``, where the error is raised."""
        try:
            return cls(partial_state())
        except Exception:  # accelerate missing or not initialisable: single process
            if required:
                raise
            return cls(None)

    @property
    def is_main(self) -> bool:
        """The process that merges shards and writes summaries (rank 0)."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of this machine (shows progress bars)."""
        return self.state is None or bool(getattr(self.state, "is_local_main_process", self.rank == 0))

    @property
    def device(self):
        """The accelerate process device (None for a single process without accelerate)."""
        return getattr(self.state, "device", None)

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def take(self, keys: Sequence, done: Collection = ()) -> list[int]:
        """Indices ``i`` of ``keys`` that this process runs: ``i % world == rank`` and ``keys[i]`` not in ``done``."""
        return [i for i, k in enumerate(keys) if i % self.world == self.rank and k not in done]

    def gather(self, objects: list) -> list:
        """Concatenation of every process's ``objects`` (plain Python values) on every process."""
        if self.world == 1:
            return list(objects)
        from accelerate.utils import gather_object

        return list(gather_object(objects))


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for the ``keys`` (default: those of either mapping) whose values
    differ — what makes a run folder unusable for resuming with the ``new`` settings."""
    keys = dict.fromkeys([*new, *old]) if keys is None else keys
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}
