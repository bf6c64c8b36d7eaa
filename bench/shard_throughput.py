"""Shard-building throughput (images/s) of igpt-build-shards on real-photo JPEGs, 1 and 2 worker processes, with
JPEG draft decoding (the default) and without (`--full-decode`, the reference path), and with augmented views
(`--views 4`: the cost of a view, from the CPU time above the plain build's).

Source: a generated ImageNet-like folder tree, JPEG crops of scikit-learn's two bundled photographs (china.jpg,
flower.jpg, 427x640) at ImageNet's typical sizes (500x375, 500x333, 375x500, 400x300, 333x500), quality 90, in 10
class folders; plus the embedded digits (1,797 8x8 arrays: per-image overhead). The palette is given, so this is
conversion only (decode, resize, quantise, write). Wall time of the whole command, worker start-up included, and
CPU time of the process and its workers (robust to other load). 1 and 2 workers must write the same bytes; the
draft and full-decode tokens are compared (share identical, mean colour distance of the decoded images).
ImageNet's 1.28M images at 32, 64 and 128 workers are projected from the per-CPU-second rate (linear in
workers; file reads from a network filesystem are not modelled).

    python bench/shard_throughput.py                  # writes bench/results/shards.{json,md}
    python bench/shard_throughput.py --images 200 --out-dir /tmp/s     # a quick check
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
from igpt_ds.data.palette import fit_palette, palette_lut, save_palette

SIZES = [(500, 375), (500, 333), (375, 500), (400, 300), (333, 500)]
IMAGENET_TRAIN = 1_281_167
VIEWS = 4


def photos() -> list[np.ndarray]:
    # Imported here, not at the top: worker processes re-import this script, and should stay light.
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def write_tree(root: Path, n_images: int) -> None:
    """`n_images` JPEGs: a random crop of one photo (aspect of the target size, 50-100% of the largest that
    fits), resized to an ImageNet size, sometimes mirrored, re-encoded at quality 90."""
    from PIL import Image

    images = photos()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        photo = images[i % 2]
        fit = min(photo.shape[1] / w, photo.shape[0] / h) * rng.uniform(0.5, 1.0)
        cw, ch = int(w * fit), int(h * fit)
        r, c = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
        img = Image.fromarray(photo[r : r + ch, c : c + cw]).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers): unlike wall time on a
    shared machine, it does not depend on what else runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def decoded_distance(a: Path, b: Path) -> dict[str, float]:
    """How far two conversions of the same images are: share of identical tokens, mean RGB distance."""
    from igpt_ds.data.palette import decode
    from igpt_ds.data.shards import ShardSplit

    x, y = (ShardSplit(p, "train") for p in (a, b))
    ta, tb = (s.batch(np.arange(len(s)))[0] for s in (x, y))
    rgb_a, rgb_b = (decode(t, x.palette).astype(np.float64) for t in (ta, tb))
    return {"tokens_identical": round(float((ta == tb).mean()), 4),
            "mean_rgb_distance": round(float(np.linalg.norm(rgb_a - rgb_b, axis=-1).mean()), 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="images in the generated tree")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible",
              "load_average_1min_before": round(os.getloadavg()[0], 2), "images": args.images, "runs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tree(tmp / "tree", args.images)
        pixels = np.concatenate([im.reshape(-1, 3) for im in photos()])
        palette = tmp / "palette.npy"
        save_palette(palette, fit_palette(pixels[:: len(pixels) // 100_000], k=512))
        palette_lut(np.load(palette), palette)  # build and cache the table outside the timings
        cases = [("jpeg", tmp / "tree", args.images, []), ("jpeg_full_decode", tmp / "tree", args.images,
                 ["--full-decode"]), ("jpeg_views4", tmp / "tree", args.images, ["--views", str(VIEWS)]),
                 ("digits", "digits", 1797, [])]  # fmt: skip
        for name, source, n_images, extra in cases:
            outputs = []
            for workers in (1, 2):
                out = tmp / f"{name}-{workers}"
                argv = [str(source), "--out", str(out), "--n-px", "32", "--palette", str(palette), *extra]
                cpu, start = cpu_seconds(), time.perf_counter()
                assert build_shards([*argv, "--workers", str(workers), "--val-fraction", "0"]) == 0
                wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
                result["runs"][f"{name}_workers{workers}"] = {
                    "images_per_s": round(n_images / wall, 1),
                    "images_per_cpu_s": round(n_images / cpu, 1),
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
                outputs.append(files(out))
            assert outputs[0] == outputs[1], f"{name}: 1 and 2 workers wrote different bytes"
        result["draft_vs_full_decode"] = decoded_distance(tmp / "jpeg-1", tmp / "jpeg_full_decode-1")
    runs = result["runs"]
    result["draft_speedup_per_cpu_s"] = round(runs["jpeg_workers1"]["images_per_cpu_s"]
                                              / runs["jpeg_full_decode_workers1"]["images_per_cpu_s"], 2)  # fmt: skip
    per_core = runs["jpeg_workers1"]["images_per_cpu_s"]
    result["imagenet_train_minutes"] = {w: round(IMAGENET_TRAIN / (per_core * w) / 60, 1) for w in (32, 64, 128)}
    # A view's cost: the CPU-seconds per image above the plain build's, shared out over the views.
    with_views = runs["jpeg_views4_workers1"]["images_per_cpu_s"]
    view_ms = (1 / with_views - 1 / per_core) / VIEWS * 1000
    result["view_cpu_ms_per_image"] = round(view_ms, 3)
    result["imagenet_train_minutes_per_view"] = {w: round(IMAGENET_TRAIN * view_ms / 1000 / w / 60, 2)
                                                 for w in (32, 64, 128)}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "shards.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "shards.md").write_text(table(result))
    print(table(result))


def table(result: dict) -> str:
    lines = [f"{result['images']} real-photo JPEGs (ImageNet sizes) and the digits, to 32x32 shards; "
             f"{result['machine']}, load {result['load_average_1min_before']} before", "",
             "| run | workers | images/s | images per CPU-s |", "|---|---|---|---|"]  # fmt: skip
    for key, r in result["runs"].items():
        name, workers = key.rsplit("_workers", 1)
        lines.append(f"| {name} | {workers} | {r['images_per_s']:,.0f} | {r['images_per_cpu_s']:,.0f} |")
    d = result["draft_vs_full_decode"]
    lines += ["", f"Draft decoding: {result['draft_speedup_per_cpu_s']}x the images per CPU-second of full decoding; "
              f"{100 * d['tokens_identical']:.1f}% of tokens identical, mean RGB distance {d['mean_rgb_distance']} "
              "(0-441) between the two.", "",
              "ImageNet train (1,281,167 images) at 32 / 64 / 128 workers: " + " / ".join(
                  f"{m} min" for m in result["imagenet_train_minutes"].values()) + " (linear in workers, reads not "
              "modelled)", "",
              f"A view (--views {VIEWS}, JPEG): {result['view_cpu_ms_per_image']} CPU-ms an image above the plain "
              "build's, each; ImageNet train at 32 / 64 / 128 workers: " + " / ".join(
                  f"{m} min" for m in result["imagenet_train_minutes_per_view"].values()) + " more per view",
              ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
