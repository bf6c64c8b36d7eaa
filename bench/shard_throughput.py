"""Shard-building throughput (images/s) of igpt-build-shards at 1 and 2 worker processes.

Sources: a generated ImageNet-like folder tree (JPEG crops of scikit-learn's two photos in 10 class
folders, 320x240 to 500x375 and portrait: decoding and antialiased resizing dominate, as on
ImageNet) and the embedded digits (1797 8x8 arrays upsampled to 32x32: per-image overhead).
The palette is given (`--palette`), so this is conversion only (fitting: encode_throughput.py).
Whole-command wall time, worker start-up included (spawned workers, ~1 s a pool, once per
conversion), and CPU time of the process and its workers. 1 and 2 workers must write the same bytes.

    python bench/shard_throughput.py             # writes bench/results/shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from data_tools.build_shards import main as build_shards
from igpt_ds.palette import fit_palette, palette_lut, save_palette

SIZES = [(320, 240), (400, 300), (500, 375), (300, 400), (333, 333)]


def photos() -> list[np.ndarray]:
    # Imported here, not at the top: worker processes re-import this script, and should stay light.
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def write_tree(root: Path, n_images: int) -> None:
    from PIL import Image

    images = photos()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        photo = images[i % 2]
        r, c = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[r : r + h, c : c + w]).save(folder / f"{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers): unlike wall time on a
    shared machine, it does not depend on what else runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6000, help="images in the generated tree")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shards.json")
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible (shared)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tree(tmp / "tree", args.images)
        pixels = np.concatenate([im.reshape(-1, 3) for im in photos()])
        palette = tmp / "palette.npy"
        save_palette(palette, fit_palette(pixels[:: len(pixels) // 100_000], k=512))
        palette_lut(np.load(palette), palette)  # build and cache the table outside the timings
        for name, source, n_images in (("jpeg_tree", tmp / "tree", args.images), ("digits", "digits", 1797)):
            outputs = []
            for workers in (1, 2):
                out = tmp / f"{name}-{workers}"
                argv = [str(source), "--out", str(out), "--n-px", "32", "--palette", str(palette)]
                cpu, start = cpu_seconds(), time.perf_counter()
                assert build_shards([*argv, "--workers", str(workers)]) == 0
                wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
                result[f"{name}_workers{workers}"] = {
                    "images_per_s": round(n_images / wall, 1),
                    "images_per_cpu_s": round(n_images / cpu, 1),
                    "load_average_1min": round(os.getloadavg()[0], 1),
                }
                outputs.append(files(out))
            assert outputs[0] == outputs[1], f"{name}: 1 and 2 workers wrote different bytes"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
