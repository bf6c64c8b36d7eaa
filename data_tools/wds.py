"""WebDataset tars as streamed sources (data_tools.streams): the standard library's tarfile in stream mode
(plain or compressed), samples grouped by key, the image by extension, the label from `.cls` or a `.json` field.

Why tarfile and not the `webdataset` package: that package is built for training pipelines (shuffling, decoding,
worker splitting); here each tar is read once, in order, with every damaged member a problem line of its own.
Layout: docs/reference.md#data-formats.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np

from data_tools import UserError
from data_tools.streams import Item, Part, StreamSource, split_of

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")


PEEK_SAMPLES = 100
"""Samples of the first tar looked at to find how a WebDataset source is labelled (the same on every rank)."""


def tar_source(spec: str, files: list[str], image_field: str | None, label_field: str | None,
                class_names: list[str] | None) -> StreamSource:  # fmt: skip
    parts = [Part(i, split_of(f), f, "tar", None) for i, f in enumerate(files)]
    peek = []
    try:
        for sample in tar_samples(files[0]):
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


def tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
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


def tar_items(source: StreamSource, part: Part, rows: np.ndarray | None) -> Iterator[Item]:
    wanted = None if rows is None else set(rows.tolist())
    last = None if rows is None else (int(rows[-1]) if len(rows) else -1)
    samples = tar_samples(part.path)
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
