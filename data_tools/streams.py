"""Image collections held as many container files: Hugging Face Parquet and `save_to_disk` Arrow datasets, and
WebDataset tars. Read one container file (a *part*) at a time, as a stream: no process ever lists every image.

Layouts (docs/reference.md#data-formats):
- Parquet: a folder (searched recursively) or a glob of `.parquet` files, as the Hugging Face Hub publishes
  datasets (`data/train-00000-of-00257.parquet`): an image column of `{"bytes", "path"}` structs (or raw bytes)
  and an integer label column; class names from the `huggingface` schema metadata (a `ClassLabel` feature). A
  file's split is the split word of its name (`validation-00000-of-00002`, `imagenet-train-000123`), else its
  folder's name, else train.
- Arrow: a `datasets.Dataset.save_to_disk` folder: `state.json` naming its `.arrow` files (Arrow IPC streams)
  and `dataset_info.json` its features; a `DatasetDict` folder holds one such folder per split
  (`dataset_dict.json`).
- WebDataset: a folder, a glob or a brace pattern (`shards-{000000..000999}.tar`) of tar files whose members
  are grouped into samples by key (the member name up to the first `.` of its base name): the image is the
  first member with an image extension (or `--image-field EXT`), the label a `.cls` member (or `--label-field
  EXT`, or `json.FIELD` for a field of the `.json` member).

Readers: data_tools.hf_tables (pyarrow, the reference implementation of both formats: the Hub's files are written
by it) and data_tools.wds (the standard library's tarfile, streaming; why not the `webdataset` package: there);
`braceexpand` (what `webdataset` uses) for brace patterns. pyarrow and braceexpand are the `sources` extra:
`pip install 'igpt-ds[sources]'`. This module holds what they share (Part, Item, StreamSource), tells a source's
format and splits, and lists it.

Labels: integers, -1 for an unlabelled image; class names from the dataset's features or `--class-names FILE`
(one per line), which also maps string labels. What cannot be converted goes to problems.txt: an image that
does not decode, a sample without an image or (in a labelled source) without a label, a label that is no class.
"""

from __future__ import annotations

import glob
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
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
"""Split words in file and folder names (the Hub's `validation`) and the split each becomes."""
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
        from data_tools import hf_tables, wds

        if part.fmt == "tar":
            return wds.tar_items(self, part, rows)
        return hf_tables.table_items(self, part, rows)

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
    from data_tools import hf_tables, wds  # they import this module's Part, Item and StreamSource

    path = Path(spec)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return hf_tables.arrow_source(path, image_field, label_field, class_names)
    files = _expand(spec)
    kind = _kind(files[0])
    if kind == "parquet":
        return hf_tables.parquet_source(spec, files, image_field, label_field, class_names)
    if kind == "arrow":
        return hf_tables.arrow_files_source(spec, files, image_field, label_field, class_names)
    return wds.tar_source(spec, files, image_field, label_field, class_names)


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
    from data_tools import hf_tables

    for part in tests:
        for _, batch in hf_tables.record_batches(part, [source.label_field], None):
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
            braceexpand = need("braceexpand")
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


def need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UserError(f"this source needs the {module} package: {EXTRA}") from None


def split_of(path: str) -> str:
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
