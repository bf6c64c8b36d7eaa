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
import re
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
    image_field: str | None = None
    """Its image column or member extension, where its split's source differs from train's (--val x.parquet with
    train's tars); None: the source's."""
    label_field: str | None = None


@dataclass(frozen=True)
class Item:
    """One sample of a part: `data` the encoded image (or the path of a file holding it; None with a problem),
    `label` -1 when unlabelled."""

    row: int
    name: str
    data: bytes | str | None
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
    labelled: bool | None = None
    """Whether a missing label is a problem (default: a label field was found)."""
    hold_out: float = 0.0
    """Fraction of the train parts' items held out as val (`held_out`), when the source has no val split."""
    seed: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.labelled is None:
            self.labelled = self.label_field is not None

    def fields(self, part: Part) -> tuple[str | None, str | None]:
        """(image field, label field) of `part`."""
        if part.image_field is not None or part.label_field is not None:
            return part.image_field, part.label_field
        return self.image_field, self.label_field

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
            return -1, "no label" if self.labelled else None
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
        kind = _kind(path.name)
        return kind is not None and (kind != "tar" or not _cifar_tar(path))
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    return _holds(path)


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


def _holds(root: Path) -> bool:
    seen = 0
    for _, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(_kind(f) for f in files if not f.startswith(".")):
            return True
        seen += len(files)
        if seen >= PEEK_FILES:
            return False
    return False


def open_stream(spec: str, image_field: str | None = None, label_field: str | None = None,
                class_names: list[str] | None = None) -> StreamSource:  # fmt: skip
    """The source named by `spec` (see the module docstring); `class_names` (from --class-names) replace the
    dataset's. Raises UserError for a pattern matching nothing, a missing reader, files of several formats, or
    columns that cannot be told apart (or read) without a flag."""
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _arrow_source(path, image_field, label_field, class_names)
    files = _expand(spec)
    kind = _kind(files[0])
    if kind == "parquet":
        return _parquet_source(spec, files, image_field, label_field, class_names)
    if kind == "arrow":
        return _arrow_files_source(spec, files, image_field, label_field, class_names)
    return _tar_source(spec, files, image_field, label_field, class_names)


def stream_splits(train: str, others: dict[str, str], image_field: str | None = None,
                  label_field: str | None = None, class_names: list[str] | None = None) -> StreamSource:  # fmt: skip
    """One streamed source per split (`--train 'train-{0000..0127}.tar' --val 'val-{0000..0006}.tar'`): each
    holds that split's files alone (a source of several splits is refused: give it as SOURCE), in any of the
    formats, its columns found on its own; class names are train's (or --class-names)."""
    sources = {"train": open_stream(train, image_field, label_field, class_names)}
    names = sources["train"].class_names
    for split, spec in others.items():
        sources[split] = open_stream(spec, image_field, label_field, class_names or names or None)
    parts, specs = [], {"train": train, **others}
    for split, source in sources.items():
        held = sorted({p.split for p in source.parts})
        if len(held) > 1:
            raise UserError(f"--{split} {specs[split]} holds the splits {held}; give it as SOURCE, or name one "
                            "split's files")  # fmt: skip
        for p in source.parts:
            parts.append(Part(len(parts), split, p.path, p.fmt, p.rows, source.image_field, source.label_field))
    described = ", ".join(f"{k} = {v}" for k, v in others.items())
    train_source = sources["train"]
    return StreamSource(f"{train_source.description}; {described}", names, parts, train_source.image_field,
                        train_source.label_field, labelled=any(s.labelled for s in sources.values()))  # fmt: skip


def hub_imagenet_splits(source: StreamSource) -> StreamSource:
    """The paper's ImageNet convention on the Hub's layout: where the test split is unlabelled (ImageNet-1k's
    test labels are withheld: every label -1) and a labelled validation split exists, validation becomes test
    and val is held out of train (--val-fraction), as `--test-labels` does for ILSVRC's folders. Reads the test
    parts' label column alone (ImageNet: 100,000 integers)."""
    tests = [p for p in source.parts if p.split == "test"]
    if not tests or not source.label_field or not any(p.split == "val" for p in source.parts):
        return source
    if any(p.fmt == "tar" or p.label_field for p in tests):  # a tar's labels are known only by reading it whole
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


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _kind(path: str) -> str | None:
    """'parquet', 'arrow' or 'tar' (compressed tars too: tarfile reads gzip, bz2 and xz streams), by file name."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "tar" if name.endswith(TAR_SUFFIXES) else None


def _expand(spec: str) -> list[str]:
    """The files a folder (searched recursively, hidden entries skipped), glob or brace pattern names, sorted; all
    of one kind (`_kind`)."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind(p.name) and not _hidden(p, path))
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
        raise UserError(f"source {spec}: no .parquet, .arrow or .tar files found")
    kinds = {_kind(f) for f in found}
    if None in kinds:
        other = next(f for f in found if _kind(f) is None)
        raise UserError(f"source {spec}: {other} is no .parquet, .arrow or .tar(.gz) file; give a pattern for those")
    if len(kinds) > 1:
        raise UserError(f"source {spec}: holds {' and '.join(sorted(kinds))} files; give a pattern for one format "
                        "(or --train/--val/--test, one source a split)")  # fmt: skip
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
    """The split a file belongs to: the split word among its name's `-`/`_`/`.`-separated words (the Hub's
    `validation-00000-of-00010.parquet`, `imagenet-train-000123.tar`), else its folder's name, else train."""
    p = Path(path)
    words = {SPLIT_NAMES[w] for w in re.split(r"[-_.]", p.name.lower()) if w in SPLIT_NAMES}
    if len(words) == 1:
        return words.pop()
    return SPLIT_NAMES.get(p.parent.name.lower(), "train")


def read_class_names(path: Path) -> list[str]:
    """--class-names: a text file of class names, one a line, in label order."""
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


def _is_image(pa, t) -> bool:
    if pa.types.is_struct(t):
        return any(t.field(i).name == "bytes" for i in range(t.num_fields))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_label(pa, t) -> bool:
    """An integer column, or class names as (dictionary-encoded) strings."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_text(pa, t) -> bool:
    return not pa.types.is_integer(t.value_type if pa.types.is_dictionary(t) else t)


def _columns(schema, features: dict, image_field: str | None, label_field: str | None, where: str,
             class_names: list[str] | None) -> tuple:  # fmt: skip
    """(image column, label column or None, class names) of an Arrow schema. Raises UserError where a column
    cannot be told apart without a flag, is missing or has a type that cannot hold images or labels."""
    pa = _need("pyarrow")
    names = schema.names
    if image_field is None:
        typed = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
        candidates = [n for n in names if _is_image(pa, schema.field(n).type)]
        typed = [n for n in typed if n in candidates] or [n for n in candidates if n.lower() in IMAGE_COLUMNS]
        image_field = typed[0] if len(typed) == 1 else candidates[0] if len(candidates) == 1 else None
        if image_field is None:
            raise UserError(f"{where}: cannot tell the image column among {candidates or names}; "
                            "name it with --image-field")  # fmt: skip
    elif image_field not in names or not _is_image(pa, schema.field(image_field).type):
        raise UserError(f"--image-field {image_field}: {where} has no image column of that name (columns {names})")
    class_label = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"]
    if label_field is None:
        usable = [n for n in names if _is_label(pa, schema.field(n).type)]
        found = [n for n in class_label if n in names] or [n for n in usable if n.lower() in LABEL_COLUMNS]
        if len(found) > 1:
            raise UserError(f"{where}: several label columns {found}; name one with --label-field")
        label_field = found[0] if found else None
    elif label_field not in names:
        raise UserError(f"--label-field {label_field}: {where} has no such column (columns {names})")
    elif not _is_label(pa, schema.field(label_field).type):
        raise UserError(f"--label-field {label_field}: {where} holds {schema.field(label_field).type}; labels are "
                        "integers or class names")  # fmt: skip
    feature = features.get(label_field or "", {})
    names_found = list(feature.get("names", [])) if isinstance(feature, dict) else []
    class_names = class_names or names_found
    if label_field and _is_text(pa, schema.field(label_field).type) and not class_names:
        raise UserError(f"{where}: the label column {label_field!r} holds class names as text; give --class-names "
                        "FILE (one name a line, in label order) to number them")  # fmt: skip
    return image_field, label_field, class_names


def _check_columns(schema, image: str, label: str | None, where: str) -> None:
    """Every file of a source must have the columns found in its first."""
    pa = _need("pyarrow")
    for column, flag in ((image, "--image-field"), (label, "--label-field")):
        if column is not None and column not in schema.names:
            raise UserError(f"{where}: no column {column!r} (it has {schema.names}), unlike the source's first file; "
                            f"give files of one layout, or name the column with {flag}")  # fmt: skip
    if not _is_image(pa, schema.field(image).type):
        raise UserError(f"{where}: column {image!r} holds {schema.field(image).type}, not images")


def _describe(kind: str, where: str, n: int, names: list[str], label: str | None) -> str:
    labels = f"{len(names)} classes" if names else "labelled" if label else "unlabelled"
    return f"{kind} {where} ({n} files, {labels})"


def _parquet_source(spec: str, files: list[str], image_field: str | None, label_field: str | None,
                    class_names: list[str] | None) -> StreamSource:  # fmt: skip
    pq = _need("pyarrow.parquet")
    parts, columns = [], None
    for i, f in enumerate(files):
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
            raise UserError(f"{f}: cannot read the Parquet footer ({e}); download the file again") from None
        schema = meta.schema.to_arrow_schema()
        if columns is None:
            columns = _columns(schema, _hf_features(schema.metadata), image_field, label_field, f, class_names)
        _check_columns(schema, columns[0], columns[1], f)
        parts.append(Part(i, _split_of(f), f, "parquet", meta.num_rows))
    image, label, names = columns
    return StreamSource(_describe("Parquet", spec, len(files), names, label), names, parts, image, label)


def _arrow_stream(pa, f: str) -> tuple[int, object]:
    """(rows, schema) of an Arrow IPC stream file (datasets' format; the file format is tried too)."""
    try:
        with pa.memory_map(str(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)), reader.schema
            return sum(len(b) for b in reader), reader.schema
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{f}: cannot read the Arrow file ({e}); save the dataset again") from None


def _arrow_parts(pa, files: list[tuple[str, str]], features: dict, image_field, label_field, class_names):
    parts, columns = [], None
    for split, f in files:
        rows, schema = _arrow_stream(pa, f)
        if columns is None:
            columns = _columns(schema, features or _hf_features(schema.metadata), image_field, label_field, str(f),
                               class_names)  # fmt: skip
        _check_columns(schema, columns[0], columns[1], str(f))
        parts.append(Part(len(parts), split, str(f), "arrow", rows))
    return parts, columns


def _arrow_source(root: Path, image_field: str | None, label_field: str | None,
                  class_names: list[str] | None) -> StreamSource:  # fmt: skip
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
    files, features = [], {}
    for split, folder in folders:
        state_file, info_file = folder / "state.json", folder / "dataset_info.json"
        if not state_file.is_file():
            raise UserError(f"{folder}: no state.json; not a save_to_disk folder")
        files += [
            (split, str(folder / d["filename"])) for d in json.loads(state_file.read_text()).get("_data_files", [])
        ]
        features = features or (json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {})
    if not files:
        raise UserError(f"{root}: the save_to_disk folder lists no .arrow files")
    parts, (image, label, names) = _arrow_parts(pa, files, features, image_field, label_field, class_names)
    return StreamSource(_describe("Arrow (save_to_disk)", str(root), len(parts), names, label), names, parts, image,
                        label)  # fmt: skip


def _arrow_files_source(spec: str, paths: list[str], image_field: str | None, label_field: str | None,
                        class_names: list[str] | None) -> StreamSource:  # fmt: skip
    """.arrow files given without their save_to_disk folder: features from each file's schema metadata."""
    pa = _need("pyarrow")
    files = [(_split_of(f), f) for f in paths]
    parts, (image, label, names) = _arrow_parts(pa, files, {}, image_field, label_field, class_names)
    return StreamSource(_describe("Arrow", spec, len(parts), names, label), names, parts, image, label)


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
        try:
            batches = iter(pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        row = 0
        for batch in batches:
            batch = batch.select(columns)
            for a in range(0, len(batch), BATCH_ROWS):
                yield row + a, batch.slice(a, BATCH_ROWS)
            row += len(batch)


def _table_items(source: StreamSource, part: Part, rows: np.ndarray | None) -> Iterator[Item]:
    pa = _need("pyarrow")
    image_field, label_field = source.fields(part)
    columns = [image_field] + ([label_field] if label_field else [])
    folder = os.path.dirname(part.path)
    for first, batch in _record_batches(part, columns, rows):
        take = range(len(batch)) if rows is None else [r - first for r in rows if first <= r < first + len(batch)]
        if not take:
            continue
        images, paths = batch.column(0), None
        if pa.types.is_struct(images.type):  # datasets' Image(): {"bytes", "path"}
            names = [images.type.field(i).name for i in range(images.type.num_fields)]
            paths = images.field("path") if "path" in names else None
            images = images.field("bytes")
        labels = batch.column(1) if label_field else None
        for j in take:
            name = f"{part.path}#{first + j}"
            label, problem = source.label(labels[j].as_py() if labels is not None else None)
            data = images[j].as_py()
            if data is None and paths is not None and paths[j].as_py():
                # datasets keeps local images as paths unless told to embed them (embed_external_files)
                path = os.path.join(folder, paths[j].as_py())
                data = path if os.path.isfile(path) else None
                problem = problem or (None if data else f"no image bytes, and its path {paths[j].as_py()} is no "
                                      "file here; save the dataset with its images embedded")  # fmt: skip
            problem = problem or (None if data is not None else "no image bytes")
            yield Item(first + j, name, data if problem is None else None, label, problem)


# --- WebDataset tars -------------------------------------------------------------------------


PEEK_SAMPLES = 100
"""Samples of the first tar looked at to find how a WebDataset source is labelled (the same on every rank)."""


def _tar_source(spec: str, files: list[str], image_field: str | None, label_field: str | None,
                class_names: list[str] | None) -> StreamSource:  # fmt: skip
    parts = [Part(i, _split_of(f), f, "tar", None) for i, f in enumerate(files)]
    peek = []
    try:
        for sample in _tar_samples(files[0]):
            peek.append(sample[1])
            if len(peek) == PEEK_SAMPLES:
                break
    except (tarfile.TarError, OSError, EOFError):
        pass  # reported as a problem of that part when it is converted
    if label_field is None:  # a .cls member in any of the first samples, else a .json "label" field
        if any("cls" in m for m in peek):
            label_field = "cls"
        elif any(isinstance(_json(m).get("label"), (int, str)) for m in peek if "json" in m):
            label_field = "json.label"
    if label_field and not class_names:
        values = [_raw_label(m, label_field) for m in peek]
        text = [v for v in values if isinstance(v, str) and not v.lstrip("-").isdigit()]
        if text:
            raise UserError(f"{files[0]}: labels are class names ({text[0]!r}); give --class-names FILE (one name a "
                            "line, in label order) to number them")  # fmt: skip
    labels = f"labels from {label_field}" if label_field else "unlabelled"
    return StreamSource(f"WebDataset {spec} ({len(files)} tars, {labels})", class_names or [], parts, image_field,
                        label_field)  # fmt: skip


def _json(members: dict[str, bytes]) -> dict:
    try:
        value = json.loads(members["json"])
    except (ValueError, KeyError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _raw_label(members: dict[str, bytes], label_field: str) -> object:
    """A sample's label as stored: a field of its .json, or a member's text (None: absent)."""
    if label_field.startswith("json."):
        return _json(members).get(label_field[5:])
    raw = members.get(label_field)
    return raw.decode("utf-8", "replace").strip() if raw is not None else None


class _EndOfArchive(tarfile.TarInfo):
    """Records how tarfile's iteration ended: at the zero block a complete archive ends with, or at a truncated or
    damaged header, which tarfile takes silently for the end once past the first member."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.end = e
            raise


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a tar (plain or compressed), in stored order (WebDataset's
    grouping: consecutive members sharing a key). Raises tarfile.TarError / OSError / EOFError at a damaged or
    truncated member, or at the end of an archive without its end-of-archive block."""
    with tarfile.open(path, mode="r|*", tarinfo=_EndOfArchive) as tar:
        tar.end = None
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
            data = tar.extractfile(m).read()
            if len(data) != m.size:
                raise tarfile.ReadError(f"member {m.name} is cut short ({len(data)} of {m.size} bytes)")
            members[ext.lower()] = data
        if not isinstance(tar.end, tarfile.EOFHeaderError):
            why = f"{tar.end}" if tar.end is not None else "no end-of-archive block"
            raise tarfile.ReadError(f"the archive ends early after {key or 'its start'} ({why}): truncated?")
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
    image_field, label_field = source.fields(part)
    exts = [image_field] if image_field else [e for e in IMAGE_EXTENSIONS if e in members]
    ext = next((e for e in exts if e in members), None)
    name = f"{part.path}:{key}.{ext or '*'}"
    problem = None
    if label_field and label_field.startswith("json.") and "json" in members and not _json(members):
        problem = "the .json member is not a JSON object"
    label, why = source.label(_raw_label(members, label_field) if label_field else None)
    problem = problem or why
    if ext is None:
        problem = f"no image member (has {sorted(members)})"
    return Item(row, name, members[ext] if problem is None else None, label, problem)
