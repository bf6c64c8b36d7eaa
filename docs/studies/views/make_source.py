"""The views study's source: 50 training images a class of the mnist5k digits (500), with mnist5k's own 500
validation and 1,000 test images, as an .npz for igpt-build-shards. A small training set makes the model memorise
it within the CPU budget, which is what augmentation is for.

    python docs/studies/views/make_source.py OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np

from data_tools.sources import mnist5k_source

PER_CLASS = 50


def main(out: str) -> None:
    source = mnist5k_source()
    arrays = {"class_names": np.array(source.class_names)}
    for name, split in source.splits.items():
        images, labels = split.take(0, len(split)), split.labels
        if name == "train":  # the first PER_CLASS of each class, in source order
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in np.unique(labels)]))
            images, labels = images[keep], labels[keep]
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images, labels
    np.savez(out, **arrays)
    print(out, {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main(sys.argv[1])
