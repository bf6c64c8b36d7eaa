"""Small on-disk sources for the data tests: image trees, fake CIFAR batches, palettes; helpers to run
the shard builder and compare output folders. Everything is generated; nothing is downloaded."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.build_shards import main as build_main
from igpt_ds.data.palette import save_palette


def rng_image(seed: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """A deterministic uint8 RGB image (h, w, 3) with some structure (a gradient plus noise)."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h).reshape(h, w, 1) * rng.uniform(0.2, 1.0, 3)
    return np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def write_image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> dict[str, Path]:
    """Class folders of images in several formats and modes (JPEG RGB/CMYK, PNG L/RGBA/16-bit, GIF P,
    nested subfolders), plus a corrupt JPEG, a truncated PNG and a text file. Returns the bad ones."""
    for c, name in enumerate(classes):
        folder = root / name
        (folder / "nested").mkdir(parents=True)
        for i in range(per_class):
            rgb = Image.fromarray(rng_image(100 * c + i, (12 + i, 10)))
            kind = i % 6
            if kind == 0:
                rgb.save(folder / f"{i}.jpg", quality=95)
            elif kind == 1:
                rgb.convert("L").save(folder / f"{i}.png")
            elif kind == 2:
                rgb.convert("RGBA").save(folder / "nested" / f"{i}.png")
            elif kind == 3:
                rgb.convert("P").save(folder / f"{i}.gif")
            elif kind == 4:
                rgb.convert("CMYK").save(folder / f"{i}.jpg")
            else:
                grey = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
                Image.fromarray(grey).save(folder / f"{i}.png")  # 16-bit greyscale PNG
    good = io.BytesIO()
    Image.fromarray(rng_image(7, (40, 40))).save(good, format="PNG")
    bad = {
        "corrupt": root / classes[0] / "corrupt.jpg",
        "truncated": root / classes[1] / "truncated.png",
        "text": root / classes[1] / "notes.txt",
    }
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    bad["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    bad["text"].write_text("not an image\n")
    return bad


def cifar_arrays(n: int, seed: int, n_classes: int) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 rows in CIFAR's channel-major layout, and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, n_classes, n).tolist()


def write_cifar(root: Path, variant: str = "10", per_batch: int = 3, tar: bool = False) -> Path:
    """A tiny CIFAR-10 or CIFAR-100 in the distributed layout (a folder, or a .tar.gz of it)."""
    if variant == "10":
        folder, label_key, n_classes = "cifar-10-batches-py", b"labels", 10
        batches = {f"data_batch_{i}": i for i in range(1, 6)} | {"test_batch": 6}
        meta = {"batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}}
    else:
        folder, label_key, n_classes = "cifar-100-python", b"fine_labels", 100
        batches = {"train": 1, "test": 2}
        meta = {"meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}}
    root.mkdir(parents=True, exist_ok=True)
    members = {name: pickle.dumps(obj, protocol=2) for name, obj in meta.items()}
    for name, seed in batches.items():
        data, labels = cifar_arrays(per_batch, seed, n_classes)
        members[name] = pickle.dumps({b"data": data, label_key: labels, b"batch_label": name.encode()}, protocol=2)
    if not tar:
        (root / folder).mkdir()
        for name, data in members.items():
            (root / folder / name).write_bytes(data)
        return root / folder
    path = root / f"cifar-{variant}-python.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def write_palette(path: Path, k: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    save_palette(path, rng.uniform(-1, 1, (k, 3)).astype(np.float32))
    return path


def build(*argv: object) -> int:
    """Run igpt-build-shards in this process (one worker unless told otherwise)."""
    args = [str(a) for a in argv]
    return build_main(args if "--workers" in args else args + ["--workers", "1"])


def read_all(root: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) of every image of a shard folder's split, checksums verified."""
    from igpt_ds.data.shards import ShardSplit

    s = ShardSplit(root, split, verify=True)
    return s.batch(np.arange(len(s)))


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- Parquet, Arrow (save_to_disk) and WebDataset sources ---------------------------------------

HF_IMAGE = {"_type": "Image"}


def _hf_schema(class_names: list[str] | None):
    import pyarrow as pa

    features = {"image": HF_IMAGE, "label": {"names": class_names, "_type": "ClassLabel"} if class_names else
                {"dtype": "int64", "_type": "Value"}}  # fmt: skip
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.schema([("image", image), ("label", pa.int64())], metadata=metadata), features


def _table(blobs: list[bytes], labels: list[int | None], class_names: list[str] | None):
    import pyarrow as pa

    schema, _ = _hf_schema(class_names)
    images = [{"bytes": b, "path": f"{i}.img"} for i, b in enumerate(blobs)]
    return pa.table({"image": images, "label": labels}, schema=schema)


def write_parquet(root: Path, splits: dict[str, tuple[list[bytes], list]], class_names=None, files: int = 2) -> Path:
    """The Hub's layout: `root/data/{split}-0000i-of-0000n.parquet`, each split's rows cut into `files` files,
    row groups of 4 rows (several per file, as large datasets have)."""
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    hub = {"train": "train", "val": "validation", "test": "test"}
    for split, (blobs, labels) in splits.items():
        cuts = np.array_split(np.arange(len(blobs)), files)
        for i, rows in enumerate(cuts):
            table = _table([blobs[r] for r in rows], [labels[r] for r in rows], class_names)
            pq.write_table(table, root / "data" / f"{hub[split]}-{i:05d}-of-{files:05d}.parquet", row_group_size=4)
    return root


def write_arrow_dataset(root: Path, splits: dict[str, tuple[list[bytes], list]], class_names=None) -> Path:
    """`datasets.DatasetDict.save_to_disk`'s layout written with pyarrow alone: dataset_dict.json, and per split
    a folder of Arrow IPC stream files with state.json and dataset_info.json."""
    import pyarrow as pa

    hub = {"train": "train", "val": "validation", "test": "test"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": [hub[s] for s in splits]}))
    for split, (blobs, labels) in splits.items():
        folder = root / hub[split]
        folder.mkdir()
        table = _table(blobs, labels, class_names)
        names = []
        for i, rows in enumerate(np.array_split(np.arange(len(blobs)), 2)):
            names.append(f"data-{i:05d}-of-00002.arrow")
            with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table.take(rows), max_chunksize=3)
        _, features = _hf_schema(class_names)
        (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                       "_split": hub[split]}))  # fmt: skip
    return root


def write_webdataset(root: Path, keys: list[str], blobs: list[bytes], labels: list, files: int = 2,
                     label: str = "cls") -> list[Path]:  # fmt: skip
    """WebDataset tars `root/shard-00000i.tar`: per sample `key.<ext>` (the extension of `key`'s file name, or
    `img`) and its label as `key.cls` or `key.json` {"label": ...} (none where the label is None)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(blobs)), files)):
        paths.append(root / f"shard-{i:06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for r in rows:
                stem, _, ext = keys[r].rpartition(".")
                members = [(f"{stem}.{ext}", blobs[r])]
                if labels[r] is not None:
                    members.append((f"{stem}.cls", str(labels[r]).encode()) if label == "cls" else
                                   (f"{stem}.json", json.dumps({"label": labels[r]}).encode()))  # fmt: skip
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def pngs(n: int, seed: int = 0, size: tuple[int, int] = (12, 10)) -> list[bytes]:
    """`n` PNG files' bytes of `rng_image(seed + i, size)`."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng_image(seed + i, size)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def tar_source(root: Path, n: int, files: int) -> Path:
    """A labelled WebDataset source of `n` 6x6 PNG samples (50 distinct images repeated) in `files` tars."""
    keys = [f"{i:07d}.png" for i in range(n)]
    blobs = (pngs(50, size=(6, 6)) * (n // 50 + 1))[:n]
    write_webdataset(root, keys, blobs, [i % 4 for i in range(n)], files=files)
    return root
