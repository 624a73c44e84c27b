"""``hf-vgrefine setup``: the post-install step (``scripts/install.sh`` runs it).

Leaves in the user's Hugging Face cache (``$HF_HOME``, or ``HF_MODULES_CACHE`` / ``HF_DATASETS_CACHE``)
what the package's three used-by lines need, so that right after installing, offline, from any working
directory::

    evaluate.load("grounding_ratio")        # the metric module in evaluate's module cache
    load_dataset("vgmed", "atlas")          # the offline VGMED build in the datasets cache
    load_dataset("vgmed")                   # default configuration: atlas

How the bare names resolve offline (``HF_HUB_OFFLINE=1``): ``evaluate.load(name)`` falls back to the newest
cached version folder under ``<modules cache>/evaluate_modules/metrics/evaluate-metric--<name>/<hash>/``;
``datasets.load_dataset(name)`` falls back to the newest cached configuration under
``<datasets cache>/<name>/<config>/<version>/<hash>/`` (arrow files + ``dataset_info.json``). Both are
written by :func:`hf_vgrefine.metrics_module.install_metric` and
:func:`hf_vgrefine.data.build.prefill_cache`; this command calls them quietly and only when needed, so
running it again is cheap and changes nothing.
"""

from __future__ import annotations



def setup(quiet: bool = True, build_atlas: bool = True) -> dict:
    """Install the metric and (if not cached yet) build VGMED ``atlas`` into the datasets cache.

    Returns ``{"metric": path, "atlas": cache entry or None, "built": bool}``. Idempotent."""
    import logging

    from .data.build import cached_path
    from .metrics_module import install_metric

    metric = install_metric()
    entry, built = None, False
    if build_atlas:
        entry = cached_path("atlas")
        if entry is not None and not _readable():
            entry = None                                   # damaged (e.g. truncated): rebuilt below, replacing it
        if entry is None:
            import datasets

            level = datasets.logging.get_verbosity()
            bars = not datasets.utils.are_progress_bars_disabled()
            if quiet:
                datasets.logging.set_verbosity_error()
                datasets.disable_progress_bars()
            logging.getLogger("hf_vgrefine").setLevel(logging.ERROR if quiet else logging.INFO)
            try:
                from .data.build import build_vgmed

                entry = build_vgmed("atlas", prefill_cache=True, write_parquet=False, progress=not quiet)
            finally:
                datasets.logging.set_verbosity(level)
                if quiet and bars:
                    datasets.enable_progress_bars()
            built = True
    return {"metric": str(metric), "atlas": None if entry is None else str(entry), "built": built}


def _readable() -> bool:
    from .data.build import load_vgmed

    try:
        ds = load_vgmed("atlas", build_if_missing=False)
        ds.select([len(ds) - 1])[0]
    except (RuntimeError, FileNotFoundError):
        return False
    return True
