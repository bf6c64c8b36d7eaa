"""Memory-mapped reader of pixel shards, opened and checked once for every rank.

Reference: docs/reference.md#preprocessing (raster-ordered colour tokens); the shards are written by
`python -m data_tools.build_shards` (format described there). numpy only at import (the shard builder's workers
import this); `open_shards` shares rank 0's reading with every rank through torch.distributed.

Memory per rank stays small on any dataset: token files are `np.memmap`ed (opened on first use, read row by row);
only the labels (8 bytes an image) are held whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from igpt_ds.config import ConfigError, DataConfig, ModelConfig
from igpt_ds.data.palette import PaletteError, load_palette

FORMAT_VERSION = 1


MANIFEST = "manifest.json"


TOKEN_DTYPE = np.dtype("<u2")


class ShardError(ValueError):
    """Missing, damaged or inconsistent shards; the message names the file."""


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder, checked for the keys and version this reader understands."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} not found; build shards with igpt-build-shards") from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not a readable manifest ({e}); rebuild the shards") from None
    keys = ("format_version", "n_px", "seq_len", "n_vocab", "palette", "class_names", "splits")
    missing = [k for k in keys if k not in manifest] if isinstance(manifest, dict) else list(keys)
    if missing:
        raise ShardError(f"{path}: lacks {', '.join(missing)}; rebuild the shards")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest['format_version']}, this reader reads {FORMAT_VERSION}")
    return manifest


class ShardSplit:
    """One split of a shard folder: `split[i]` is image i's tokens (seq_len,) uint16, no copy (its evaluation crop);
    `n_views` augmented views of each image beside them when built with `--views` (the train split)."""

    def __init__(self, root: str | Path, split: str = "train", verify: bool = False):
        self.root, self.split = Path(root), split
        self.manifest = read_manifest(self.root)
        self.n_px: int = self.manifest["n_px"]
        self.seq_len: int = self.manifest["seq_len"]
        self.n_vocab: int = self.manifest["n_vocab"]
        self.class_names: list[str] = self.manifest["class_names"]
        if split not in self.manifest["splits"]:
            have = ", ".join(self.manifest["splits"])
            raise ShardError(f"{self.root / MANIFEST}: no split {split!r} (has: {have})")
        self._shards = self.manifest["splits"][split]["shards"]
        self.n_views: int = self.manifest["splits"][split].get("views", 0)
        self._offsets = np.cumsum([0] + [s["n"] for s in self._shards])  # first index of each shard
        for s in self._shards:
            self._check(s["tokens"], s["n"] * self.seq_len * TOKEN_DTYPE.itemsize, s["sha256"] if verify else None)
            if self.n_views:
                size = s["n"] * self.n_views * self.seq_len * TOKEN_DTYPE.itemsize
                self._check(s["views"], size, s["views_sha256"] if verify else None)
            if verify:
                self._check(s["labels"], None, s["labels_sha256"])
        self.labels = np.concatenate([self._load_labels(s) for s in self._shards] or [np.zeros(0, np.int64)])
        palette = self.manifest["palette"]
        self._check(palette["file"], None, palette["sha256"] if verify else None)
        try:
            self.palette = load_palette(self.root / palette["file"])
        except PaletteError as e:
            raise ShardError(str(e)) from None
        if len(self.palette) != self.n_vocab:
            raise ShardError(f"{self.root / palette['file']}: {len(self.palette)} colours, not n_vocab={self.n_vocab}")
        self._maps: list[np.ndarray | None] = [None] * len(self._shards)
        self._view_maps: list[np.ndarray | None] = [None] * len(self._shards)

    @classmethod
    def checked(
        cls, root: str | Path, split: str, manifest: dict, labels: np.ndarray, palette: np.ndarray
    ) -> ShardSplit:
        """A split another process has opened and checked (`open_shards`: rank 0), from what it read: no file is
        stat'ed, hashed or read here until rows are (memory-mapped on first use)."""
        self = cls.__new__(cls)
        self.root, self.split, self.manifest = Path(root), split, manifest
        self.n_px, self.seq_len, self.n_vocab = manifest["n_px"], manifest["seq_len"], manifest["n_vocab"]
        self.class_names = manifest["class_names"]
        self._shards = manifest["splits"][split]["shards"]
        self.n_views = manifest["splits"][split].get("views", 0)
        self._offsets = np.cumsum([0] + [s["n"] for s in self._shards])
        self.labels, self.palette = labels, palette
        self._maps, self._view_maps = [None] * len(self._shards), [None] * len(self._shards)
        return self

    def files(self) -> list[tuple[str, str]]:
        """(file name, sha256 in the manifest) of every file this split reads: tokens, views and labels of each
        shard, the palette."""
        kinds = ("tokens", "views", "labels") if self.n_views else ("tokens", "labels")
        out = [(s[k], s["sha256" if k == "tokens" else f"{k}_sha256"]) for s in self._shards for k in kinds]
        return [*out, (self.manifest["palette"]["file"], self.manifest["palette"]["sha256"])]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.split} split of {n} images")
        i %= n
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self._map(shard)[i - self._offsets[shard]]

    def batch(self, indices: np.ndarray, views: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 (B, seq_len), labels int64 (B,)) for `indices`, in their order: the evaluation crops, or
        with `views` (B,) int64 in [0, n_views) those views of the images (`igpt_ds.data.views` chooses them).

        Rows are read shard by shard in increasing order, which keeps disk reads sequential. ShardError naming the
        file and row when a token is >= n_vocab (a file overwritten or built for another palette: without
        data.verify_checksums nothing else sees it, and the embedding lookup would fail mid-run with an index error
        naming nothing): one max over the rows just read, on the host, in the read-ahead thread.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"indices must be 1-D in [0, {len(self)}) for the {self.split} split")
        if views is not None:
            views = np.asarray(views, dtype=np.int64)
            if views.shape != indices.shape or (len(views) and (views.min() < 0 or views.max() >= self.n_views)):
                raise IndexError(f"views must be ({len(indices)},) in [0, {self.n_views}) for the {self.split} split")
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        shard_of = np.searchsorted(self._offsets, ordered, side="right") - 1
        tokens = np.empty((len(indices), self.seq_len), dtype=np.int64)
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for rows in np.split(np.arange(len(ordered)), bounds):
            if len(rows):
                shard = int(shard_of[rows[0]])
                at = ordered[rows] - self._offsets[shard]
                if views is None:
                    tokens[order[rows]] = self._map(shard)[at]
                else:
                    tokens[order[rows]] = self._map_views(shard)[at, views[order[rows]]]
        if len(tokens) and tokens.max() >= self.n_vocab:
            self._out_of_vocabulary(indices, tokens, "tokens" if views is None else "views")
        return tokens, self.labels[indices]

    def _out_of_vocabulary(self, indices: np.ndarray, tokens: np.ndarray, file: str) -> None:
        row = int(np.flatnonzero(tokens.max(axis=1) >= self.n_vocab)[0])
        i = int(indices[row])
        shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
        raise ShardError(f"{self.root / self._shards[shard][file]}: row {i - self._offsets[shard]} holds token "
                         f"{int(tokens[row].max())}, not below n_vocab={self.n_vocab}: the file was overwritten or "
                         "built with another palette; rebuild the shards")  # fmt: skip

    def _map(self, shard: int) -> np.ndarray:
        if self._maps[shard] is None:
            path = self.root / self._shards[shard]["tokens"]
            shape = (self._shards[shard]["n"], self.seq_len)
            self._maps[shard] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=shape).view(np.ndarray)
        return self._maps[shard]

    def _map_views(self, shard: int) -> np.ndarray:
        if self._view_maps[shard] is None:
            path = self.root / self._shards[shard]["views"]
            shape = (self._shards[shard]["n"], self.n_views, self.seq_len)
            self._view_maps[shard] = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=shape).view(np.ndarray)
        return self._view_maps[shard]

    def _check(self, name: str, size: int | None, sha256: str | None) -> None:
        path = self.root / name
        if not path.is_file():
            raise ShardError(f"{path} is missing; rebuild the shards")
        if size is not None and path.stat().st_size != size:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, expected {size}: truncated or damaged")
        if sha256 is not None and sha256_file(path) != sha256:
            raise ShardError(f"{path}: sha256 does not match {MANIFEST}: the file is damaged")

    def _load_labels(self, shard: dict[str, Any]) -> np.ndarray:
        path = self.root / shard["labels"]
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable labels ({e})") from None
        if labels.shape != (shard["n"],) or labels.dtype != np.int64:
            raise ShardError(f"{path}: labels {labels.dtype} {labels.shape}, expected int64 ({shard['n']},)")
        top = len(self.class_names) or np.iinfo(np.int64).max  # a labelled folder names its classes
        bad = np.flatnonzero((labels < -1) | (labels >= top))
        if len(bad):
            classes = f"{len(self.class_names)} classes" if self.class_names else "labels"
            raise ShardError(f"{path}: row {bad[0]} has label {labels[bad[0]]}, outside the manifest's {classes} "
                             "(0..n-1, or -1 for none); rebuild the shards")  # fmt: skip
        return labels


def open_shards(model: ModelConfig, data: DataConfig, split: str) -> ShardSplit:
    """A shard split, checked against the model (n_px, vocabulary) before anything reads it; ConfigError (one line,
    on every rank) for a folder without a manifest, a missing, damaged or empty split, or another image size or
    palette size.

    Collective in a distributed job, and read once: rank 0 reads the manifest, checks every shard file's size and
    reads the labels (8 bytes an image) and the palette, and every rank receives them; with
    `data.verify_checksums` the ranks hash the files between them, each file once. Shared-storage reads at start-up
    for a split of F files, N images and D bytes, at R ranks: before, R x (F stats + 8N label bytes [+ D hashed]);
    now F stats + 8N bytes [+ D hashed], whatever R (ImageNet at 32x32: N = 1.28M, D = 2.6 GB; at 1,024 ranks
    10 GB of labels and 2.7 TB of hashing before, 10 MB and 2.6 GB now). Memory per rank: the labels, 8N bytes."""
    from igpt_ds.distributed.rank0 import on_rank0

    def check() -> tuple[dict, np.ndarray, np.ndarray]:
        if not (Path(data.shards) / MANIFEST).is_file():
            raise ConfigError(f"data.shards={data.shards} holds no {MANIFEST}; build shards with igpt-build-shards")
        try:
            shards = ShardSplit(data.shards, split)
        except ShardError as e:
            raise ConfigError(str(e)) from None
        if not len(shards):
            raise ConfigError(f"the {split} split of {data.shards} is empty")
        if (shards.n_px, shards.n_vocab) != (model.n_px, model.n_vocab):
            raise ConfigError(
                f"shards {data.shards} hold {shards.n_px}x{shards.n_px} images over {shards.n_vocab} colours but "
                f"the model has model.n_px={model.n_px}, model.n_vocab={model.n_vocab}"
            )
        return shards.manifest, shards.labels, shards.palette

    shards = ShardSplit.checked(data.shards, split, *on_rank0(check))
    if data.verify_checksums:
        verify_checksums(shards)
    return shards


def verify_checksums(shards: ShardSplit) -> None:
    """Hash every file of the split against the manifest, the files shared out among the ranks by size (the
    largest first, each to the least loaded rank: sizes from the manifest, no stat), each file hashed once and the
    dataset read once, in parallel; ranks wait for each other by polling, never inside a long collective
    (`distributed.rank0.on_every_rank`). The same ConfigError on every rank, naming the first damaged file."""
    from igpt_ds.distributed.process_group import rank_and_world
    from igpt_ds.distributed.rank0 import on_every_rank

    rank, world = rank_and_world()
    sizes = {s["tokens"]: s["n"] * shards.seq_len * TOKEN_DTYPE.itemsize for s in shards._shards}
    sizes.update({s["views"]: s["n"] * shards.n_views * shards.seq_len * 2 for s in shards._shards if "views" in s})
    sizes.update({s["labels"]: 8 * s["n"] for s in shards._shards})
    load, owner = [0] * world, {}
    for name, _ in sorted(shards.files(), key=lambda f: (-sizes.get(f[0], 0), f[0])):
        owner[name] = min(range(world), key=lambda r: (load[r], r))
        load[owner[name]] += sizes.get(name, 0)

    def hash_mine() -> list[str]:
        return [name for name, digest in shards.files() if owner[name] == rank
                and sha256_file(shards.root / name) != digest]  # fmt: skip

    damaged = sorted(name for part in on_every_rank(hash_mine) for name in part)
    if damaged:
        raise ConfigError(f"{shards.root / damaged[0]}: sha256 does not match {MANIFEST}: the file is damaged"
                          + (f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""))  # fmt: skip
