"""Hugging Face datasets' files as streamed sources (data_tools.streams): Parquet as the Hub publishes it and
`datasets.save_to_disk` Arrow folders (Arrow IPC streams), read with pyarrow, a record batch at a time.

Layouts and the columns' conventions: docs/reference.md#data-formats. Columns are found from the `huggingface`
schema metadata's features (an `Image`, a `ClassLabel`), else by type and name; every file of a source must have
the first file's columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_tools import UserError
from data_tools.streams import SPLIT_NAMES, Item, Part, StreamSource, need, split_of

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class", "target")
BATCH_ROWS = 64
"""Rows read at once from a part: a worker task's worth (data_tools.build_shards.CHUNK)."""


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
    pa = need("pyarrow")
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
    pa = need("pyarrow")
    for column, flag in ((image, "--image-field"), (label, "--label-field")):
        if column is not None and column not in schema.names:
            raise UserError(f"{where}: no column {column!r} (it has {schema.names}), unlike the source's first file; "
                            f"give files of one layout, or name the column with {flag}")  # fmt: skip
    if not _is_image(pa, schema.field(image).type):
        raise UserError(f"{where}: column {image!r} holds {schema.field(image).type}, not images")


def _describe(kind: str, where: str, n: int, names: list[str], label: str | None) -> str:
    labels = f"{len(names)} classes" if names else "labelled" if label else "unlabelled"
    return f"{kind} {where} ({n} files, {labels})"


def parquet_source(spec: str, files: list[str], image_field: str | None, label_field: str | None,
                    class_names: list[str] | None) -> StreamSource:  # fmt: skip
    pq = need("pyarrow.parquet")
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
        parts.append(Part(i, split_of(f), f, "parquet", meta.num_rows))
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


def arrow_source(root: Path, image_field: str | None, label_field: str | None,
                  class_names: list[str] | None) -> StreamSource:  # fmt: skip
    pa = need("pyarrow")
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


def arrow_files_source(spec: str, paths: list[str], image_field: str | None, label_field: str | None,
                        class_names: list[str] | None) -> StreamSource:  # fmt: skip
    """.arrow files given without their save_to_disk folder: features from each file's schema metadata."""
    pa = need("pyarrow")
    files = [(split_of(f), f) for f in paths]
    parts, (image, label, names) = _arrow_parts(pa, files, {}, image_field, label_field, class_names)
    return StreamSource(_describe("Arrow", spec, len(parts), names, label), names, parts, image, label)


def record_batches(part: Part, columns: list[str], rows: np.ndarray | None) -> Iterator[tuple[int, object]]:
    """(first row, record batch of `columns`) over the part, BATCH_ROWS rows at a time; with `rows`, only batches
    of the row groups (Parquet) that hold some of them."""
    pa = need("pyarrow")
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


def table_items(source: StreamSource, part: Part, rows: np.ndarray | None) -> Iterator[Item]:
    pa = need("pyarrow")
    image_field, label_field = source.fields(part)
    columns = [image_field] + ([label_field] if label_field else [])
    folder = os.path.dirname(part.path)
    for first, batch in record_batches(part, columns, rows):
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
