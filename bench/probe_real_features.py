"""Real features for bench/probe_speed.py: a real network's (correlated, ill-conditioned) features of real digits, at
the mnist5k study's size and at 54k-row scale (issue 25, item 4).

The network: the views study's 8-view model (docs/studies/views: 8 blocks, width 64, 14x14 MNIST over 16 grey
levels, 1,000 steps), `--checkpoint studies_out/views/runs/views8`. Both sets are tokenised with that run's palette
(`--palette`, fitted on its shards), so the model sees the colours it was trained on.
  mnist5k   igpt-build-shards mnist5k (3,500 train / 500 val / 1,000 test images), features of every layer: 9 x 64.
  views56k  mnist5k's 3,500 train images each as its evaluation crop (14x14, Lanczos) and 15 augmented views
            (data_tools.images.load_views: the paper's random resized crop, short side 256-384, crop 224, seed 0,
            at 14x14: what `igpt-build-shards --views` stores), every view its own train image: 56,000 train
            rows; val and test are mnist5k's (500 / 1,000). Views of one digit are 16 correlated rows, as
            augmented training sets are.
Takes ~10 minutes on 2 cores (feature extraction: ~200 images/s). Data stay under `--out` (never committed).

    python bench/probe_real_features.py --out studies_out/probe_real
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VIEWS = 15
"""Augmented views of each train image beside its evaluation crop."""
N_PX = 14


def views_source(out: Path) -> None:
    """mnist5k as an .npz whose train split holds every image's crop and VIEWS views (56,000 images)."""
    from PIL import Image

    from data_tools.images import ViewTransform, load_views
    from data_tools.sources import mnist5k_source

    source = mnist5k_source()
    arrays = {"class_names": np.array(source.class_names)}
    for name, split in source.splits.items():
        images, labels = split.take(0, len(split)), split.labels
        if name == "train":
            crops = np.stack([np.asarray(Image.fromarray(im).resize((N_PX, N_PX), Image.LANCZOS)) for im in images])
            views = np.stack(
                [load_views(im, N_PX, ViewTransform(), 0, i, VIEWS)[..., 0] for i, im in enumerate(images)]
            )
            images = np.concatenate([crops[:, None], views], 1).reshape(-1, N_PX, N_PX)  # (n · (1 + VIEWS), 14, 14)
            labels = np.repeat(labels, 1 + VIEWS)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels
    np.savez(out, **arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "studies_out/views/runs/views8")
    p.add_argument("--palette", type=Path, default=REPO / "studies_out/views/shards-views8/palette.npy")
    p.add_argument("--out", type=Path, default=REPO / "studies_out/probe_real")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "views56k.npz").is_file():
        views_source(args.out / "views56k.npz")
    for name, source in (("mnist5k", "mnist5k"), ("views56k", str(args.out / "views56k.npz"))):
        shards, features = args.out / f"{name}_shards", args.out / "features" / name
        if not (shards / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "data_tools.build_shards", source, "--out", str(shards),
                            "--n-px", str(N_PX), "--palette", str(args.palette), "--workers", "2"],
                           cwd=REPO, env=env, check=True)  # fmt: skip
        if not (features / "test" / "index.json").is_file():
            subprocess.run([sys.executable, "launcher/extract_features.py", "--checkpoint", str(args.checkpoint),
                            "--shards", str(shards), "--out", str(features), "--batch_size", "256"],
                           cwd=REPO, env=env, check=True)  # fmt: skip
        print(f"{name}: {features}", flush=True)


if __name__ == "__main__":
    main()
