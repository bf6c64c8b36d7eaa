"""Shard-building throughput (images/s) of igpt-build-shards on real-photo JPEGs, 1 and 2 worker processes, with
JPEG draft decoding (the default) and without (`--full-decode`, the reference path), with augmented views
(`--views 4`: the cost of a view, from the CPU time above the plain build's), and from the same JPEGs held in
Parquet files (the Hub's layout) and WebDataset tars (4 parts each; their tokens must equal the tree's); the peak
RSS of a build of a synthetic 200k-sample tar source and of one a tenth its size; and the projected wall time of
ImageNet and of 100M images at 1, 16 and 64 nodes.

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


def write_containers(tree: Path, parquet: Path, wds: Path, parts: int = 4) -> None:
    """The tree's JPEG bytes and labels, in the tree's listing order, as the Hub's Parquet layout (`parts` files
    of `data/train-*.parquet`, an image struct column and a ClassLabel) and as `parts` WebDataset tars."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.sources import folder_source

    source = folder_source(tree)
    split = source.splits["train"]
    features = {"image": {"_type": "Image"}, "label": {"names": source.class_names, "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    (parquet / "data").mkdir(parents=True)
    wds.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(split)), parts)):
        paths = [split.items[r] for r in rows]
        blobs = [Path(p).read_bytes() for p in paths]
        labels = [int(split.labels[r]) for r in rows]
        table = pa.table({"image": [{"bytes": b, "path": Path(p).name} for b, p in zip(blobs, paths, strict=True)],
                          "label": labels})  # fmt: skip
        pq.write_table(table.replace_schema_metadata(meta), parquet / "data" / f"train-{i:05d}-of-{parts:05d}.parquet")
        with tarfile.open(wds / f"shard-{i:06d}.tar", "w") as tar:
            for r, blob, label in zip(rows, blobs, labels, strict=True):
                for name, data in ((f"{r:08d}.jpg", blob), (f"{r:08d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def same_tokens(a: Path, b: Path) -> bool:
    from igpt_ds.data.shards import ShardSplit

    x, y = (ShardSplit(p, "train") for p in (a, b))
    return bool(np.array_equal(x.batch(np.arange(len(x)))[0], y.batch(np.arange(len(y)))[0]))


def peak_rss(root: Path, n: int) -> dict[str, float]:
    """Peak RSS (MB) of the builder process of a build of a synthetic WebDataset source of `n` samples (6x6 PNGs
    with .cls labels, in tars of 10,000 samples), with --workers 1 (decoding in it) and 2 (in worker processes).
    Read from /proc/self/status's VmHWM, the peak of the process's own memory since it started (getrusage's
    ru_maxrss would also count the memory of this benchmark, which the child is forked from)."""
    import io
    import subprocess
    import sys
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    root.mkdir()
    for f, start in enumerate(range(0, n, 10_000)):
        with tarfile.open(root / f"shard-{f:06d}.tar", "w") as tar:
            for i in range(start, min(n, start + 10_000)):
                for name, data in ((f"{i:09d}.png", blobs[i % 64]), (f"{i:09d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = {"samples": n, "tar_mb": round(sum(p.stat().st_size for p in root.iterdir()) / 1e6, 1)}
    for workers in (1, 2):
        code = ("import re, sys; from data_tools.build_shards import main; "
                f"rc = main([{str(root)!r}, '--out', {str(root) + f'-out{workers}'!r}, '--n-px', '6', '--k', '16', "
                f"'--workers', '{workers}', '--palette-samples', '20000']); "
                "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); sys.exit(rc)")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))  # fmt: skip
        out[f"workers{workers}"] = round(int(done.stdout.split()[-1]) / 1024, 1)
    return out


NODE_CORES = 32
WEB_IMAGES = 100_000_000
IMAGE_KB = 110
"""ImageNet's mean JPEG size (train: ~140 GB for 1.28M images); web images are taken to be the same."""


def projection(per_core: float, palette_s: float) -> dict:
    """Wall time (minutes) of a Parquet build at 1, 16 and 64 nodes of NODE_CORES cores: the palette fit (rank 0,
    measured), then decoding from the measured images per CPU-second (linear in cores: parts are independent) or
    reading at a storage bandwidth of 1 and 10 GB/s shared by all nodes, whichever is longer."""
    out = {"images_per_core_s": per_core, "node_cores": NODE_CORES, "image_kb": IMAGE_KB, "palette_fit_s": palette_s}
    for name, n in (("imagenet_train", IMAGENET_TRAIN), ("web_100m", WEB_IMAGES)):
        tb = n * IMAGE_KB / 1e9
        rows = {}
        for nodes in (1, 16, 64):
            rows[nodes] = {"decode_min": round(n / (per_core * NODE_CORES * nodes) / 60, 2),
                           "read_min_1GBps": round(tb * 1e3 / 1 / 60, 2),
                           "read_min_10GBps": round(tb * 1e3 / 10 / 60, 2)}  # fmt: skip
        out[name] = {"tb": round(tb, 2), "nodes": rows}
    return out


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
    parser.add_argument("--rss-items", type=int, default=200_000, help="samples of the synthetic tar source whose "
                        "peak RSS is measured (and a tenth of them)")  # fmt: skip
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
        write_containers(tmp / "tree", tmp / "parquet", tmp / "wds")
        cases = [("jpeg", tmp / "tree", args.images, []), ("jpeg_full_decode", tmp / "tree", args.images,
                 ["--full-decode"]), ("jpeg_views4", tmp / "tree", args.images, ["--views", str(VIEWS)]),
                 ("parquet", tmp / "parquet", args.images, []), ("webdataset", tmp / "wds", args.images, []),
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
        for container in ("parquet", "webdataset"):  # the same JPEG bytes in the same order: the same tokens
            assert same_tokens(tmp / "jpeg-1", tmp / f"{container}-1"), f"{container}: tokens differ from the tree's"
        # The palette fit (rank 0's alone; the other ranks wait for its file): the same Parquet build without
        # --palette, less the build with it.
        start = time.perf_counter()
        assert build_shards([str(tmp / "parquet"), "--out", str(tmp / "parquet-fit"), "--n-px", "32", "--workers",
                             "2", "--val-fraction", "0"]) == 0  # fmt: skip
        fit_s = time.perf_counter() - start - args.images / result["runs"]["parquet_workers2"]["images_per_s"]
        result["palette_fit_s"] = round(fit_s, 1)
        result["rss_mb"] = {n: peak_rss(tmp / f"rss{n}", n) for n in (args.rss_items // 10, args.rss_items)}
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
    result["projection"] = projection(runs["parquet_workers1"]["images_per_cpu_s"], result["palette_fit_s"])
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
    rss = result["rss_mb"]
    lines += [
        "Peak RSS of a build of a synthetic WebDataset source (6x6 PNGs, tars of 10,000 samples), MB:",
        "",
        "| samples | tar MB | builder, --workers 1 | builder, --workers 2 |",
        "|---|---|---|---|",
    ]
    for r in rss.values():
        lines.append(f"| {r['samples']:,} | {r['tar_mb']:,} | {r['workers1']} | {r['workers2']} |")
    p = result["projection"]
    lines += [
        "",
        f"Projected wall time of a Parquet build ({p['images_per_core_s']:,.0f} images per core-second "
        f"measured above, {p['node_cores']} cores a node, {p['image_kb']} KB an image; reading at the "
        "storage's aggregate bandwidth; wall = the palette fit + the larger of decode and read; the fit (1M "
        f"pixels, k = 512, rank 0 alone while the others wait for its file) took {p['palette_fit_s']} s here):",
        "",
        "| collection | nodes | decode min | read min at 1 GB/s | read min at 10 GB/s |",
        "|---|---|---|---|---|",
    ]
    for name in ("imagenet_train", "web_100m"):
        for nodes, r in p[name]["nodes"].items():
            lines.append(
                f"| {name} ({p[name]['tb']} TB) | {nodes} | {r['decode_min']} | {r['read_min_1GBps']} | "
                f"{r['read_min_10GBps']} |"
            )
    lines.append("")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
