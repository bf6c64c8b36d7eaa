"""Palette throughput: table encode vs brute-force argmin, table build time, k-means fit time.

Peers measured in the same process (ratios hold on a busy machine):
  - table: igpt_ds.data.palette.encode with the 2^24-entry table (exact),
  - brute force: igpt_ds.data.palette.encode_bruteforce, chunked float64 numpy argmin (the definition),
  - matmul: float32 ||x||² - 2x·c + ||c||² argmin through BLAS, the usual fast brute force (HF's
    processor does this; not exact at near-ties, shown for scale only).
Fit: 1M pixels sampled from scikit-learn's two photos (~140k distinct colours) and 1M uniformly
random colours (~970k distinct, the worst case), k = 512.

    python bench/encode_throughput.py            # writes bench/results/encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_sample_images

from igpt_ds.data.palette import build_lut, encode, encode_bruteforce, fit_palette


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the least disturbed by other processes) and the result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def cpu_and_wall(fn) -> tuple[float, float, object]:
    """CPU seconds of this process (all its threads) and wall seconds of one call: on a shared
    machine the CPU time is the steadier figure; wall ≈ CPU / threads when the cores are free."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def matmul_argmin(rgb: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    x = rgb.reshape(-1, 3).astype(np.float32) / 127.5 - 1
    c2 = (centres**2).sum(1)
    return np.concatenate([np.argmin(c2 - 2 * xs @ centres.T, axis=1) for xs in np.array_split(x, len(x) // chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit-pixels", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    photos = np.concatenate([im.reshape(-1, 3) for im in load_sample_images().images])
    photo_sample = photos[rng.integers(0, len(photos), args.fit_pixels)]
    random_sample = rng.integers(0, 256, (args.fit_pixels, 3), dtype=np.uint8)

    fit_photo = cpu_and_wall(lambda: fit_palette(photo_sample, k=args.k, seed=0))
    fit_random = cpu_and_wall(lambda: fit_palette(random_sample, k=args.k, seed=0))
    centres = fit_photo[2]
    lut_cpu_s, lut_s, lut = cpu_and_wall(lambda: build_lut(centres))

    pixels = photo_sample[: 1 << 20]
    table_s, tokens = timed(lambda: encode(pixels, lut), repeats=5)
    few = pixels[: 1 << 18]  # brute force is slow: time a quarter of the pixels
    brute_s, brute = timed(lambda: encode_bruteforce(few, centres), repeats=2)
    matmul_s, _ = timed(lambda: matmul_argmin(few, centres), repeats=2)
    assert np.array_equal(tokens[: len(few)], brute), "table and brute force disagree"
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"1-min load average {os.getloadavg()[0]:.1f} at the end (machine shared)",
        "k": args.k,
        "kmeans_fit_wall_s": {"photos_1M": round(fit_photo[1], 2), "uniform_random_1M": round(fit_random[1], 2)},
        "kmeans_fit_cpu_s": {"photos_1M": round(fit_photo[0], 2), "uniform_random_1M": round(fit_random[0], 2)},
        "distinct_colours": {
            "photos_1M": len(np.unique(photo_sample, axis=0)),
            "uniform_random_1M": len(np.unique(random_sample, axis=0)),
        },
        "lut_build_wall_s": round(lut_s, 3),
        "lut_build_cpu_s": round(lut_cpu_s, 3),
        "pixels_per_s": {
            "table": round(len(pixels) / table_s),
            "bruteforce_float64": round(len(few) / brute_s),
            "matmul_float32": round(len(few) / matmul_s),
        },
    }
    speed = result["pixels_per_s"]
    result["table_vs_bruteforce"] = round(speed["table"] / speed["bruteforce_float64"])
    result["table_vs_matmul"] = round(speed["table"] / speed["matmul_float32"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
