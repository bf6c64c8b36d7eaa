"""Print a shard folder's summary and draw a PNG grid of decoded samples with their labels.

Reference: docs/reference.md#preprocessing (decode = rint(127.5·(c + 1)), igpt_ds.data.palette.decode).

Launch:
    python -m data_tools.inspect_shards DIR [--split train] [--n 64] [--out grid.png] [--views-out V.png] [--verify]
    igpt-inspect-shards demo_out/shards --out demo_out/grid.png

A split built with `--views K` also gets a second PNG (`--views-out`, by default beside --out): a few of its images,
one a row, the evaluation crop first, then each stored view and its mirror image (data.flip).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_tools.build_shards import printable
from igpt_ds.atomic import atomic_file
from igpt_ds.data.palette import decode
from igpt_ds.data.shards import ShardError, ShardSplit
from igpt_ds.data.views import flip_left_right

TILE = 64
"""Samples are upscaled (nearest neighbour, whole factors) to at least this many pixels a side."""
CAPTION = 14  # pixels of caption under each tile


def summary(shards: ShardSplit) -> str:
    m = shards.manifest
    names = m["class_names"]
    classes = f"{len(names)} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else "no names"
    lines = [
        f"shards     {shards.root}",
        f"source     {m.get('source', '?')}",
        f"images     {m['n_px']}x{m['n_px']} (seq_len {m['seq_len']}), vocabulary {m['n_vocab']} colours",
        f"palette    {m['palette']['file']} sha256 {m['palette']['sha256'][:16]}...",
        f"classes    {classes}",
    ]
    for split, entry in m["splits"].items():
        labels = ShardSplit(shards.root, split).labels
        lines.append(f"{split:<10} {entry['n']} images in {len(entry['shards'])} shards; {label_counts(labels, names)}")
    if "views" in m:
        v = m["views"]
        lines.append(f"views      {v['k']} a training image ({', '.join(v['splits'])}): random crops of "
                     f"{v['crop'] / v['short_side'][1]:.2f}-{v['crop'] / v['short_side'][0]:.2f} of the short side "
                     f"(short side {v['short_side'][0]:g}-{v['short_side'][1]:g}, crop {v['crop']:g}), "
                     f"seed {v['seed']}")  # fmt: skip
    lines.append(f"skipped    {m.get('skipped', 0)} (problems.txt)")
    return "\n".join(lines)


def label_counts(labels: np.ndarray, class_names: list[str]) -> str:
    """How a split's images are labelled, from its labels alone (arrays need no class names for this)."""
    labelled = labels[labels >= 0]
    if not len(labelled):
        return "unlabelled"
    ids, counts = np.unique(labelled, return_counts=True)
    name = lambda k: class_names[k] if k < len(class_names) else str(k)
    shown = ", ".join(f"{name(int(k))}: {c}" for k, c in zip(ids[:10], counts[:10], strict=True))
    spread = f"; {counts.min()}-{counts.max()} a class" if len(ids) > 10 else ""
    unlabelled = f"; {len(labels) - len(labelled)} unlabelled" if len(labelled) < len(labels) else ""
    return f"{len(ids)} labels ({shown}{', ...' if len(ids) > 10 else ''}{spread}){unlabelled}"


def grid(shards: ShardSplit, n: int) -> Image.Image:
    """Up to `n` samples spread evenly over the split (class-sorted sources show every class),
    decoded with the split's palette, each captioned with its class name or label."""
    picks = np.unique(np.linspace(0, len(shards) - 1, min(n, len(shards))).round().astype(np.int64))
    tokens, labels = shards.batch(picks)
    images = decode(tokens, shards.palette).reshape(len(picks), shards.n_px, shards.n_px, 3)
    scale = max(1, math.ceil(TILE / shards.n_px))
    side = shards.n_px * scale
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    canvas = Image.new("RGB", (cols * (side + 2), rows * (side + CAPTION + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (k % cols) * (side + 2) + 1, (k // cols) * (side + CAPTION + 2) + 1
        canvas.paste(Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.text((x, y + side), _caption(int(label), shards.class_names), fill=(0, 0, 0), font=font)
    return canvas


def views_grid(shards: ShardSplit, n: int) -> Image.Image:
    """Up to `n` images spread over the split, one a row: the evaluation crop, then each of the split's views and
    the views mirrored left to right (what data.flip trains on), upscaled like `grid`'s tiles."""
    picks = np.unique(np.linspace(0, len(shards) - 1, min(n, len(shards))).round().astype(np.int64))
    rows = [shards.batch(picks)[0]] + [shards.batch(picks, np.full(len(picks), v))[0] for v in range(shards.n_views)]
    rows += [flip_left_right(r.copy(), shards.n_px, np.ones(len(picks), bool)) for r in rows[1:]]
    scale = max(1, math.ceil(TILE / shards.n_px))
    side = shards.n_px * scale
    canvas = Image.new("RGB", (len(rows) * (side + 2) + 4, len(picks) * (side + 2) + CAPTION), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    heads = ["crop"] + [f"view {v}" for v in range(shards.n_views)] + [f"{v} flipped" for v in range(shards.n_views)]
    for c, (tokens, head) in enumerate(zip(rows, heads, strict=True)):
        x = c * (side + 2) + 1 + (4 if c else 0)  # a gap after the evaluation crop
        draw.text((x, 1), head, fill=(0, 0, 0), font=ImageFont.load_default())
        images = decode(tokens, shards.palette).reshape(len(picks), shards.n_px, shards.n_px, 3)
        for r, img in enumerate(images):
            canvas.paste(Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST),
                         (x, CAPTION + r * (side + 2)))  # fmt: skip
    return canvas


def _caption(label: int, class_names: list[str]) -> str:
    if label < 0:
        return "unlabelled"
    return class_names[label] if label < len(class_names) else str(label)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="igpt-inspect-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, metavar="DIR", help="shard folder (holds manifest.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG to write")
    p.add_argument(
        "--views-out",
        type=Path,
        default=None,
        help="PNG of the split's augmented views (default: beside --out, when the split has views)",
    )
    p.add_argument("--views-n", type=int, default=8, help="images in the views PNG, one a row")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.n < 1:
            raise ShardError(f"--n {args.n} must be at least 1")
        shards = ShardSplit(args.root, args.split, verify=args.verify)
        print(printable(summary(shards)))
        if not len(shards):
            raise ShardError(f"split {args.split!r} of {args.root} is empty; nothing to draw")
        if args.views_out is not None and not shards.n_views:
            raise ShardError(f"split {args.split!r} of {args.root} holds no views (built without --views); drop "
                             "--views-out")  # fmt: skip
        with atomic_file(args.out) as f:
            grid(shards, args.n).save(f, format="PNG")
        if shards.n_views:
            views_out = args.views_out or args.out.with_name(f"{args.out.stem}-views.png")
            with atomic_file(views_out) as f:
                views_grid(shards, args.views_n).save(f, format="PNG")
            print(f"wrote {views_out}")
    except ShardError as e:
        print(f"igpt-inspect-shards: error: {printable(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
