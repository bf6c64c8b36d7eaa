"""Image collections held as many container files: Hugging Face Parquet and `save_to_disk` Arrow datasets, and
WebDataset tars. Read one container file (a *part*) at a time, as a stream: no process ever lists every image.

Layouts (docs/reference.md#data-formats):
- Parquet: a folder (searched recursively) or a glob of `.parquet` files, as the Hugging Face Hub publishes
  datasets (`data/train-00000-of-00257.parquet`): an image column of `{"bytes", "path"}` structs (or raw bytes)
  and an integer label column; class names from the `huggingface` schema metadata (a `ClassLabel` feature). A
  file's split is the word before its first `-` (or its folder's name) when that is a split name.
- Arrow: a `datasets.Dataset.save_to_disk` folder: `state.json` naming its `.arrow` files (Arrow IPC streams)
  and `dataset_info.json` its features; a `DatasetDict` folder holds one such folder per split
  (`dataset_dict.json`).
- WebDataset: a folder, a glob or a brace pattern (`shards-{000000..000999}.tar`) of tar files whose members
  are grouped into samples by key (the member name up to the first `.` of its base name): the image is the
  first member with an image extension (or `--image-field EXT`), the label a `.cls` member (or `--label-field
  EXT`, or `json.FIELD` for a field of the `.json` member).

Readers: pyarrow for Parquet and Arrow (the reference implementation of both formats: the Hub's files are
written by it); the standard library's `tarfile` for tars, streaming (`r|*`), rather than the `webdataset`
package, which is built for training pipelines (shuffling, decoding, worker splitting) and would add a
dependency for what is here a sequential read of one archive; `braceexpand` (what `webdataset` uses) for
brace patterns. pyarrow and braceexpand are the `sources` extra: `pip install 'igpt-ds[sources]'`.

Labels: integers, -1 for an unlabelled image; class names from the dataset's features or `--class-names FILE`
(one per line), which also maps string labels. What cannot be converted goes to problems.txt: an image that
does not decode, a sample without an image or (in a labelled source) without a label, a label that is no class.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools import UserError
from igpt_ds.data.views import keyed_draws

EXTRA = "pip install 'igpt-ds[sources]' (pyarrow, braceexpand)"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
"""Split words in file and folder names (the Hub's `validation`) and the split each becomes."""
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class", "target")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
BATCH_ROWS = 64
"""Rows read at once from a Parquet/Arrow part: a worker task's worth (data_tools.build_shards.CHUNK)."""
HOLD_OUT = 0x484F4C44  # "HOLD": keeps the held-out draws apart from any other use of the build's seed


@dataclass(frozen=True)
class Part:
    """One container file of a source: converted whole, by one rank, into shard files of its own."""

    index: int
    """Position among all the source's parts (every split), sorted as listed."""
    split: str
    path: str
    fmt: str
    """'parquet', 'arrow' or 'tar'."""
    rows: int | None
    """Images in it, from the file's metadata (None for a tar: unknown until read)."""


@dataclass(frozen=True)
class Item:
    """One sample of a part: `data` the encoded image (None with a problem), `label` -1 when unlabelled."""

    row: int
    name: str
    data: bytes | None
    label: int
    problem: str | None = None


@dataclass
class StreamSource:
    description: str
    class_names: list[str]
    parts: list[Part]
    image_field: str | None
    label_field: str | None
    """None: unlabelled."""
    hold_out: float = 0.0
    """Fraction of the train parts' items held out as val (`held_out`), when the source has no val split."""
    seed: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    def splits(self) -> list[str]:
        names = {p.split for p in self.parts} | ({"val"} if self.hold_out else set())
        return [s for s in ("train", "val", "test") if s in names]

    def items(self, part: Part, rows: np.ndarray | None = None) -> Iterator[Item]:
        """The samples of `part` in stored order; with `rows` (sorted), those rows alone (a Parquet file reads only
        the row groups that hold them; a tar stops after the last)."""
        if part.fmt == "tar":
            return _tar_items(self, part, rows)
        return _table_items(self, part, rows)

    def held_out(self, part: Part, rows: np.ndarray) -> np.ndarray:
        """(n,) bool: which rows of a train part go to val: a draw keyed by (seed, part, row) below `hold_out`,
        so the same images are held out however the parts fall to ranks (about `hold_out` of them)."""
        if part.split != "train" or not self.hold_out:
            return np.zeros(len(rows), bool)
        draws = keyed_draws(self.seed ^ HOLD_OUT, np.full(len(rows), part.index), rows)
        return (draws >> np.uint64(11)).astype(np.float64) / 2.0**53 < self.hold_out

    def label(self, raw: object) -> tuple[int, str | None]:
        """(label, problem) of a raw label value: an int (-1: unlabelled) or a class name."""
        if raw is None:
            return -1, "no label" if self.label_field else None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace").strip()
        if isinstance(raw, str):
            try:
                raw = int(raw)
            except ValueError:
                if raw in self.class_names:
                    return self.class_names.index(raw), None
                return -1, f"unknown label {raw!r}"
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if not isinstance(raw, int) or raw < -1 or (self.class_names and raw >= len(self.class_names)):
            return -1, f"unknown label {raw!r}"
        return raw, None


def is_stream_spec(spec: str) -> bool:
    """Whether `spec` names a Parquet, Arrow or WebDataset source (a pattern, or a folder of such files); a .tar of
    CIFAR's python batches is CIFAR's."""
    if any(c in spec for c in "*?[{"):
        return True
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        return suffix in (".parquet", ".arrow") or (suffix == ".tar" and not _cifar_tar(path))
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    return _holds(path, (".parquet", ".tar"))


def _cifar_tar(path: Path) -> bool:
    from data_tools.sources import CIFAR

    try:
        with tarfile.open(path) as tar:
            first = tar.next()
    except (tarfile.TarError, OSError):
        return False
    return first is not None and first.name.split("/")[0] in {spec["folder"] for spec in CIFAR.values()}


PEEK_FILES = 1000
"""Files looked at to tell a folder of Parquet files or tars from an image folder (an ImageNet tree is not walked)."""


def _holds(root: Path, suffixes: tuple[str, ...]) -> bool:
    seen = 0
    for _, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(f.lower().endswith(suffixes) for f in files):
            return True
        seen += len(files)
        if seen >= PEEK_FILES:
            return False
    return False


def open_stream(spec: str, image_field: str | None = None, label_field: str | None = None,
                class_names: Path | None = None) -> StreamSource:  # fmt: skip
    """The source named by `spec` (see the module docstring). Raises UserError for a pattern matching nothing, a
    missing reader, or columns that cannot be told apart without a flag."""
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        source = _arrow_source(path, image_field, label_field)
    else:
        files = _expand(spec)
        kinds = {Path(f).suffix.lower() for f in files}
        if kinds == {".parquet"}:
            source = _parquet_source(spec, files, image_field, label_field)
        elif kinds == {".tar"}:
            source = _tar_source(spec, files, image_field, label_field)
        else:
            raise UserError(f"source {spec}: matches {sorted(kinds)} files; give Parquet files or tars, not a mix")
    if class_names is not None:
        source.class_names = _read_class_names(class_names)
    return source


def stream_splits(train: str, others: dict[str, str], image_field: str | None = None,
                  label_field: str | None = None, class_names: Path | None = None) -> StreamSource:  # fmt: skip
    """One streamed source per split (`--train 'train-{0000..0127}.tar' --val 'val-{0000..0006}.tar'`): every
    part of each becomes that split's; the columns and class names are train's."""
    source = open_stream(train, image_field, label_field, class_names)
    parts = [Part(p.index, "train", p.path, p.fmt, p.rows) for p in source.parts]
    for split, spec in others.items():
        extra = open_stream(spec, image_field or source.image_field, label_field or source.label_field, class_names)
        parts += [Part(len(parts) + i, split, p.path, p.fmt, p.rows) for i, p in enumerate(extra.parts)]
    described = ", ".join(f"{k} = {v}" for k, v in others.items())
    return StreamSource(f"{source.description}; {described}", source.class_names, parts, source.image_field,
                        source.label_field)  # fmt: skip


def hub_imagenet_splits(source: StreamSource) -> StreamSource:
    """The paper's ImageNet convention on the Hub's layout: where the test split is unlabelled (ImageNet-1k's
    test labels are withheld: every label -1) and a labelled validation split exists, validation becomes test
    and val is held out of train (--val-fraction), as `--test-labels` does for ILSVRC's folders. Reads the test
    parts' label column alone (ImageNet: 100,000 integers)."""
    tests = [p for p in source.parts if p.split == "test"]
    if not tests or not source.label_field or not any(p.split == "val" for p in source.parts):
        return source
    for part in tests:
        for _, batch in _record_batches(part, [source.label_field], None):
            if any(v is not None and v != -1 for v in batch.column(0).to_pylist()):
                return source
    parts, dropped = [], len(tests)
    for p in source.parts:
        if p.split != "test":
            parts.append(Part(len(parts), "test" if p.split == "val" else p.split, p.path, p.fmt, p.rows))
    description = (f"{source.description}; test = the labelled validation split, its unlabelled test split "
                   f"({dropped} files) left out")  # fmt: skip
    return StreamSource(description, source.class_names, parts, source.image_field, source.label_field)


def _expand(spec: str) -> list[str]:
    """The files a folder, glob or brace pattern names, sorted (a folder: its .parquet, else its .tar files)."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.parquet") if not _hidden(p, path))
        found = found or sorted(str(p) for p in path.rglob("*.tar") if not _hidden(p, path))
    elif path.is_file():
        found = [spec]
    else:
        patterns = [spec]
        if "{" in spec:
            braceexpand = _need("braceexpand")
            patterns = list(braceexpand.braceexpand(spec))
        found = sorted({f for p in patterns for f in (glob.glob(p) if any(c in p for c in "*?[") else [p])})
        missing = [f for f in found if not os.path.isfile(f)]
        if missing:
            raise UserError(f"source {spec}: {len(missing)} files of the pattern do not exist, e.g. {missing[0]}")
    if not found:
        raise UserError(f"source {spec}: no .parquet or .tar files found")
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"this source needs the {module} package: {EXTRA}") from None


def _split_of(path: str) -> str:
    """The split a file belongs to: the Hub's `{split}-00000-of-00010.parquet`, else its folder's name."""
    p = Path(path)
    word = p.name.split("-")[0].split(".")[0].lower()
    if word in SPLIT_NAMES:
        return SPLIT_NAMES[word]
    return SPLIT_NAMES.get(p.parent.name.lower(), "train")


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--class-names {path} does not exist; give a text file with one class name a line")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"--class-names {path} holds no names")
    return names


# --- Parquet and Arrow -----------------------------------------------------------------------


def _hf_features(metadata: dict | None) -> dict:
    """The `features` of the Hugging Face metadata an Arrow schema carries (empty when it has none)."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info.get("info", {}).get("features", {}) or {}


def _columns(schema, features: dict, image_field: str | None, label_field: str | None, where: str) -> tuple:
    """(image column, label column or None, class names) of an Arrow schema."""
    pa = _need("pyarrow")

    def is_image(f) -> bool:
        t = f.type
        if pa.types.is_struct(t):
            return any(t.field(i).name == "bytes" for i in range(t.num_fields))
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    names = schema.names
    if image_field is None:
        typed = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
        candidates = [n for n in names if is_image(schema.field(n))]
        typed = [n for n in typed if n in candidates] or [n for n in candidates if n.lower() in IMAGE_COLUMNS]
        image_field = typed[0] if len(typed) == 1 else candidates[0] if len(candidates) == 1 else None
        if image_field is None:
            raise UserError(f"{where}: cannot tell the image column among {candidates or names}; "
                            "name it with --image-field")  # fmt: skip
    elif image_field not in names or not is_image(schema.field(image_field)):
        raise UserError(f"--image-field {image_field}: {where} has no image column of that name (columns {names})")
    class_label = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"]
    if label_field is None:
        ints = [n for n in names if pa.types.is_integer(schema.field(n).type)]
        found = [n for n in class_label if n in names] or [n for n in ints if n.lower() in LABEL_COLUMNS]
        if len(found) > 1:
            raise UserError(f"{where}: several label columns {found}; name one with --label-field")
        label_field = found[0] if found else None
    elif label_field not in names:
        raise UserError(f"--label-field {label_field}: {where} has no such column (columns {names})")
    feature = features.get(label_field or "", {})
    class_names = list(feature.get("names", [])) if isinstance(feature, dict) else []
    return image_field, label_field, class_names


def _parquet_source(spec: str, files: list[str], image_field: str | None, label_field: str | None) -> StreamSource:
    pq = _need("pyarrow.parquet")
    parts, columns = [], None
    for i, f in enumerate(files):
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
            raise UserError(f"{f}: cannot read the Parquet footer ({e}); download the file again") from None
        if columns is None:
            schema = meta.schema.to_arrow_schema()
            columns = _columns(schema, _hf_features(schema.metadata), image_field, label_field, f)
        parts.append(Part(i, _split_of(f), f, "parquet", meta.num_rows))
    image, label, names = columns
    kind = f"{len(names)} classes" if names else "labelled" if label else "unlabelled"
    return StreamSource(f"Parquet {spec} ({len(files)} files, {kind})", names, parts, image, label)


def _arrow_source(root: Path, image_field: str | None, label_field: str | None) -> StreamSource:
    pa = _need("pyarrow")
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        folders = [(SPLIT_NAMES.get(s.lower()), root / s) for s in splits]
        unknown = [str(f) for s, f in folders if s is None]
        if unknown:
            raise UserError(f"{root}: splits {unknown} are not train/validation/test; build them with --train/--val")
    else:
        state = json.loads((root / "state.json").read_text())
        folders = [(SPLIT_NAMES.get(str(state.get("_split") or "train").lower(), "train"), root)]
    parts, columns = [], None
    for split, folder in folders:
        state_file, info_file = folder / "state.json", folder / "dataset_info.json"
        if not state_file.is_file():
            raise UserError(f"{folder}: no state.json; not a save_to_disk folder")
        files = [folder / d["filename"] for d in json.loads(state_file.read_text()).get("_data_files", [])]
        features = json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {}
        for f in files:
            try:
                with pa.memory_map(str(f)) as source:
                    reader = pa.ipc.open_stream(source)
                    rows = sum(len(b) for b in reader)
                    schema = reader.schema
            except (OSError, pa.ArrowInvalid) as e:
                raise UserError(f"{f}: cannot read the Arrow file ({e}); save the dataset again") from None
            if columns is None:
                columns = _columns(schema, features or _hf_features(schema.metadata), image_field, label_field,
                                   str(f))  # fmt: skip
            parts.append(Part(len(parts), split, str(f), "arrow", rows))
    if not parts:
        raise UserError(f"{root}: the save_to_disk folder lists no .arrow files")
    image, label, names = columns
    kind = f"{len(names)} classes" if names else "labelled" if label else "unlabelled"
    return StreamSource(f"Arrow (save_to_disk) {root} ({len(parts)} files, {kind})", names, parts, image, label)


def _record_batches(part: Part, columns: list[str], rows: np.ndarray | None) -> Iterator[tuple[int, object]]:
    """(first row, record batch of `columns`) over the part, BATCH_ROWS rows at a time; with `rows`, only batches
    of the row groups (Parquet) that hold some of them."""
    pa = _need("pyarrow")
    if part.fmt == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(part.path)
        first = 0
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if rows is None or np.any((rows >= first) & (rows < first + n)):
                row = first
                for batch in f.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns):
                    yield row, batch
                    row += len(batch)
            first += n
        return
    with pa.memory_map(part.path) as source:  # zero-copy: pages are read only where values are touched
        row = 0
        for batch in pa.ipc.open_stream(source):
            batch = batch.select(columns)
            for a in range(0, len(batch), BATCH_ROWS):
                yield row + a, batch.slice(a, BATCH_ROWS)
            row += len(batch)


def _table_items(source: StreamSource, part: Part, rows: np.ndarray | None) -> Iterator[Item]:
    columns = [source.image_field] + ([source.label_field] if source.label_field else [])
    for first, batch in _record_batches(part, columns, rows):
        take = range(len(batch)) if rows is None else [r - first for r in rows if first <= r < first + len(batch)]
        if not take:
            continue
        images = batch.column(0)
        if hasattr(images.type, "num_fields"):  # {"bytes", "path"}
            images = images.field("bytes")
        labels = batch.column(1) if source.label_field else None
        for j in take:
            blob = images[j].as_py()
            label, problem = source.label(labels[j].as_py() if labels is not None else None)
            if blob is None:
                problem = "no image bytes"
            yield Item(first + j, f"{part.path}#{first + j}", blob if problem is None else None, label, problem)


# --- WebDataset tars -------------------------------------------------------------------------


def _tar_source(spec: str, files: list[str], image_field: str | None, label_field: str | None) -> StreamSource:
    parts = [Part(i, "train", f, "tar", None) for i, f in enumerate(files)]
    if label_field is None:  # labelled when the first sample carries a .cls member: the same answer on every rank
        first = next(_tar_samples(files[0]), None)
        label_field = "cls" if first is not None and "cls" in first[1] else None
    kind = "labelled" if label_field else "unlabelled"
    return StreamSource(f"WebDataset {spec} ({len(files)} tars, {kind})", [], parts, image_field, label_field)


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar, in stored order (WebDataset's grouping: consecutive
    members sharing a key). Raises tarfile.TarError / OSError / EOFError at a damaged member."""
    with tarfile.open(path, mode="r|*") as tar:
        key, members = None, {}
        for m in tar:
            tar.members = []  # tarfile keeps every header read; a million-member tar would hold them all
            if not m.isfile():
                continue
            folder, base = os.path.split(m.name)
            stem, _, ext = base.partition(".")
            if stem.startswith(".") or not stem:
                continue
            k = os.path.join(folder, stem)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext.lower()] = tar.extractfile(m).read()
        if key is not None:
            yield key, members


def _tar_items(source: StreamSource, part: Part, rows: np.ndarray | None) -> Iterator[Item]:
    wanted = None if rows is None else set(rows.tolist())
    last = None if rows is None else (int(rows[-1]) if len(rows) else -1)
    samples = _tar_samples(part.path)
    row = 0
    while last is None or row <= last:
        try:
            sample = next(samples, None)
        except (tarfile.TarError, OSError, EOFError) as e:
            yield Item(row, f"{part.path}#{row}", None, -1, f"the archive cannot be read past here ({e})")
            return
        if sample is None:
            return
        if wanted is None or row in wanted:
            yield _tar_item(source, part, row, *sample)
        row += 1


def _tar_item(source: StreamSource, part: Part, row: int, key: str, members: dict[str, bytes]) -> Item:
    exts = [source.image_field] if source.image_field else [e for e in IMAGE_EXTENSIONS if e in members]
    ext = next((e for e in exts if e in members), None)
    name = f"{part.path}:{key}.{ext or '*'}"
    raw, problem = None, None
    field_ = source.label_field
    if field_ and field_.startswith("json."):
        try:
            raw = json.loads(members["json"]).get(field_[5:]) if "json" in members else None
        except (ValueError, AttributeError):
            problem = "the .json member is not a JSON object"
    elif field_:
        raw = members.get(field_)
    label, why = source.label(raw)
    problem = problem or why
    if ext is None:
        problem = f"no image member (has {sorted(members)})"
    return Item(row, name, members[ext] if problem is None else None, label, problem)
