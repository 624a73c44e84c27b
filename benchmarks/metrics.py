"""Throughput of the grounding-score core: every score over 100,000 maps of 576 tokens on CPU.

Random maps (peaky, like attention) and random box-shaped regions on the 24 x 24 token grid. Prints,
per score, the median wall time (and CPU time) of computing that score alone, then the time of all
scores in one ``grounding_scores`` call (work shared), single-threaded and with every core, and the
ratio to the 2 s target.

    python benchmarks/metrics.py [--n 100000] [--grid 24] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from hf_vgrefine import metrics as M

TARGET_S = 2.0


def make_inputs(n: int, grid: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``maps [n, grid²]`` float64 and box masks ``[n, grid²]`` bool (1..grid/2 cells per side)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, grid * grid)) ** 4
    h = rng.integers(1, grid // 2 + 1, n)
    w = rng.integers(1, grid // 2 + 1, n)
    r0 = rng.integers(0, grid - h + 1)
    c0 = rng.integers(0, grid - w + 1)
    rows = np.arange(grid)
    in_r = (rows[None, :] >= r0[:, None]) & (rows[None, :] < (r0 + h)[:, None])
    in_c = (rows[None, :] >= c0[:, None]) & (rows[None, :] < (c0 + w)[:, None])
    masks = (in_r[:, :, None] & in_c[:, None, :]).reshape(n, grid * grid)
    return maps, masks


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of maps")
    ap.add_argument("--grid", type=int, default=24, help="token grid side (N = grid²)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads for the multi-threaded total (0 = all cores)")
    args = ap.parse_args(argv)

    maps, masks = make_inputs(args.n, args.grid)
    n_tok = maps.shape[1]
    threads = args.threads or os.cpu_count() or 1
    print(f"grounding scores: {args.n:,} maps x {n_tok} tokens (float64), box regions "
          f"(mean f = {masks.mean():.3f}), numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}")
    M.grounding_scores(maps[:2000], masks[:2000])  # warm-up

    print(f"{'score':<22}{'wall s':>9}{'cpu s':>9}")
    total_single = 0.0
    for name in M.ALL:
        wall, cpu = timed(lambda name=name: M.grounding_scores(maps, masks, [name], n_threads=1), args.repeats)
        total_single += wall
        print(f"{name:<22}{wall:9.3f}{cpu:9.3f}")
    print(f"{'sum of the above':<22}{total_single:9.3f}")
    wall1, cpu1 = timed(lambda: M.grounding_scores(maps, masks, n_threads=1), args.repeats)
    print(f"{'all, one call, 1 thr':<22}{wall1:9.3f}{cpu1:9.3f}   ratio to {TARGET_S:.0f} s target: {wall1 / TARGET_S:.2f}")
    if threads > 1:
        walln, cpun = timed(lambda: M.grounding_scores(maps, masks, n_threads=threads), args.repeats)
        print(f"{f'all, one call, {threads} thr':<22}{walln:9.3f}{cpun:9.3f}   ratio to {TARGET_S:.0f} s target: "
              f"{walln / TARGET_S:.2f}")
    try:
        load = os.getloadavg()[0]
        print(f"(1-min load average during the run: {load:.2f} on {os.cpu_count()} CPUs)")
    except OSError:  # pragma: no cover
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
