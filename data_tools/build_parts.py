"""A shard build from a streamed source (Parquet, Arrow, WebDataset: data_tools.streams), on one process or
spread over the ranks of a launch: `srun igpt-build-shards ...`, `mpirun -np N igpt-build-shards ...`
(launcher/slurm/build_shards.sbatch).

Each container file of the source is a *part*, converted whole, by rank `part.index % world`, into shard files
of its own (its train images, the ones it holds out as val, its problems) in a work folder beside --out,
`.<out>.parts-<identity>/part-00012/`, which appears by a rename once the part is complete. The identity hashes
the arguments and the source's files (names, sizes, modification times), so a killed build reruns with the
same command and redoes only the parts that were not complete; changed arguments or files start afresh.

Coordination is through that folder (it must be on storage every rank sees), never a collective: the palette is
fitted once, by rank 0, from a sample of a few parts (`sample_pixels`), and written there; the other ranks
wait for the file, then convert their parts. Rank 0, when its own parts are done, waits for every other part,
gathers the shard files under their final names (renames, no copy), writes the manifest and publishes --out as
the single-process builder does. Nothing in a part depends on which rank converted it, so the output is
byte-identical at any world size and worker count.

Memory per rank, whatever the source's size: the worker pool's window (4 x workers tasks of CHUNK encoded
images: for ImageNet JPEGs of ~110 KB, 4 x 32 x 64 x 110 KB = 0.9 GB at 32 workers, 56 MB at 2), a record
batch of hf_tables.BATCH_ROWS rows, one shard's labels (8 bytes an image), and the list of parts (a few hundred
bytes each: 10k tars, a few MB). No list of images is ever built; problems stream to each part's problems.txt.

Listing cost, paid by every rank so that each finds the same parts and the same work folder without talking to the
others: one stat a file (the identity), plus one footer read a Parquet file (its row count and schema) and, for the
Hub's ImageNet layout, the test files' label column. For ImageNet's ~300 Parquet files (257 of train) that is ~300
footer reads a rank: 300 / 19,200 / 307,200 small reads over 1 / 64 / 1,024 ranks; for 10,000 tars, 10,000 stats
a rank (0.64M at 64 ranks). A build runs one rank a node (16-64 nodes), where this is seconds; the conversion reads
the collection itself once in all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools import UserError
from data_tools import build_shards as B
from data_tools.streams import Item, Part, StreamSource
from igpt_ds.atomic import publish_dir, write_text
from igpt_ds.data.palette import fit_palette, load_palette, palette_lut, save_palette
from igpt_ds.distributed.rank_env import launch_rank

POLL_S = 2.0
"""How often waiting ranks look for the palette or the other parts (a directory listing: cheap on any storage)."""
SAMPLE_PARTS = 64
"""Train parts the palette's pixel sample is drawn from at most: enough to cover a collection's variety while
reading a small share of it (ImageNet's 257 Parquet train files: a quarter of them, a few rows of each)."""


def build_streamed(args: argparse.Namespace, source: StreamSource, out: Path) -> Path:
    """Convert `source` into shards at `out` on this rank's parts; rank 0 publishes when every part is done."""
    rank, world = launch_rank()
    work = out.parent / f".{out.name}.parts-{identity(args, source)[:16]}"
    work.mkdir(exist_ok=True)
    palette = shared_palette(work, source, args, rank)
    lut = palette_lut(palette, args.palette or work / "palette.npy")  # the table cached beside the palette file
    mine = [p for p in source.parts if p.index % world == rank and not (work / part_name(p)).is_dir()]
    owned = sum(p.index % world == rank for p in source.parts)
    print(f"rank {rank} of {world}: {len(mine)} of its {owned} parts to convert ({len(source.parts)} in all)",
          flush=True)  # fmt: skip
    failed = work / f"failed-rank-{rank}.txt"
    failed.unlink(missing_ok=True)
    started = time.time()
    try:
        with B._Workers(args.workers, B._settings(args, lut)) as workers:
            for part in tqdm(mine, desc=f"rank {rank} parts", unit="part", disable=None):
                convert_part(work, part, source, workers, args)
    except (UserError, OSError) as e:  # told to rank 0, which would otherwise wait for these parts for ever
        write_text(failed, f"{e}\n")
        raise
    if rank != 0:
        return out
    wait_for_parts(work, source.parts, started)
    manifest = assemble(work, out, source, palette, args)
    for stale in out.parent.glob(f".{out.name}.parts-*"):
        shutil.rmtree(stale, ignore_errors=True)
    print(B.printable(B._summary(out, manifest)))
    return out


def identity(args: argparse.Namespace, source: StreamSource) -> str:
    """sha256 of what the output depends on: the recorded arguments and each part's file (name, size, mtime)."""
    files = []
    for p in source.parts:
        st = os.stat(p.path)
        files.append([p.path, p.split, st.st_size, st.st_mtime_ns])
    payload = {"args": B.recorded_args(args), "source": source.description, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def part_name(part: Part) -> str:
    return f"part-{part.index:05d}"


# --- the palette, fitted once ----------------------------------------------------------------


def shared_palette(work: Path, source: StreamSource, args: argparse.Namespace, rank: int) -> np.ndarray:
    """--palette, or the palette rank 0 fits and writes to `work` (the others wait for the file)."""
    if args.palette:
        return load_palette(args.palette)
    path = work / "palette.npy"
    if rank == 0 and not path.is_file():
        palette = fit_palette(sample_pixels(source, args), args.k or 512, args.seed)
        palette_lut(palette, path)  # the lookup table cached beside it first: the other ranks read it, not build it
        save_palette(path, palette)  # atomic: its appearance tells the others it is complete
    waited = 0.0
    while not path.is_file():
        if waited == 0:
            print(f"rank {rank}: waiting for rank 0's palette ({path})", flush=True)
        time.sleep(POLL_S)
        waited += POLL_S
    return load_palette(path)


def sample_pixels(source: StreamSource, args: argparse.Namespace) -> np.ndarray:
    """`--palette-samples` random pixels (N, 3) uint8 of resized training images, without a pass over the source:
    up to SAMPLE_PARTS train parts chosen at random, and from each an equal share of the images, evenly spaced
    over its rows where the format says how many (Parquet, Arrow: only their row groups are read), its first
    ones otherwise (a tar is read from the start). Deterministic in --seed."""
    rng = np.random.default_rng(args.seed)
    train = [p for p in source.parts if p.split == "train"]
    if not train:
        held = sorted({p.split for p in source.parts})
        raise UserError(f"{source.description}: no train files (it holds {held}) to fit the palette on; give the "
                        "train files too (or --train A --val B), or --palette")  # fmt: skip
    chosen = [train[i] for i in np.sort(rng.choice(len(train), min(len(train), SAMPLE_PARTS), replace=False))]
    n_img = math.ceil(B.PIXEL_POOL * args.palette_samples / args.n_px**2)
    per_part = math.ceil(n_img / len(chosen))

    unreadable: list[Item] = []

    def items() -> Iterator[Item]:
        for part in chosen:
            n = per_part if part.rows is None else min(per_part, part.rows)
            rows = np.arange(n) if part.rows is None else np.unique(np.linspace(0, part.rows - 1, n).round())
            rows = rows.astype(np.int64)
            keep = rows[~source.held_out(part, rows)]
            for it in source.items(part, keep):
                if it.problem is None:
                    yield it
                elif len(unreadable) < 1:
                    unreadable.append(it)

    pixels, first_problem = [], None
    with B._Workers(args.workers, B._settings(args, None)) as workers:
        tasks = ((range(len(c)), [it.data for it in c], 0) for c in chunked(items(), B.CHUNK))
        for rgb, _, problems in tqdm(workers.map(tasks), desc="palette pixels", unit="task", disable=None):
            first_problem = first_problem or (problems[0][1] if problems else None)
            pixels.append(rgb.reshape(-1, 3))
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
    if not len(pixels):
        if unreadable:
            first_problem = f"{unreadable[0].name}: {unreadable[0].problem}"
        if first_problem is None:
            raise UserError(f"{source.description}: its train files hold no images; give the train split's files")
        raise UserError(f"none of the sampled training images could be read, e.g. {first_problem}")
    return pixels[rng.choice(len(pixels), min(args.palette_samples, len(pixels)), replace=False)]


def chunked(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- one part --------------------------------------------------------------------------------


def convert_part(work: Path, part: Part, source: StreamSource, workers, args: argparse.Namespace) -> None:
    """Convert `part` into `work/part-NNNNN/` (shards of its splits, problems.txt, part.json): written in a
    temporary sibling and renamed when complete, so a killed build leaves either a whole part or none."""
    for stale in work.glob(f".{part_name(part)}.tmp-*"):  # a killed run's: parts are owned by one rank at a time
        shutil.rmtree(stale, ignore_errors=True)
    tmp = work / f".{part_name(part)}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    try:
        _convert_part(tmp, part, source, workers, args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(work / part_name(part))


def _convert_part(tmp: Path, part: Part, source: StreamSource, workers, args: argparse.Namespace) -> None:
    views = args.views if part.split == "train" else 0
    writers = {part.split: B._ShardWriter(tmp, part.split, args.shard_size, views)}
    if part.split == "train" and source.hold_out:
        writers["val"] = B._ShardWriter(tmp, "val", args.shard_size, 0)
    skipped = 0
    pending: deque[tuple[list[Item], list[Item]]] = deque()  # chunks in flight (good, unreadable): the pool's window

    def tasks() -> Iterator[tuple[list[int], list[bytes], int]]:
        for chunk in chunked(source.items(part), B.CHUNK):
            good = [it for it in chunk if it.problem is None]
            pending.append((good, [it for it in chunk if it.problem is not None]))
            yield [(part.index << 32) | it.row for it in good], [it.data for it in good], views

    with open(tmp / "problems.txt", "wb") as problem_file:
        for tokens, view_tokens, failed in workers.map(tasks()):
            good, unreadable = pending.popleft()
            # In row order, whatever the worker count: the listing's problems and the decoder's together.
            problems = sorted([(it.row, it.name, it.problem) for it in unreadable]
                              + [(good[j].row, good[j].name, reason) for j, reason in failed])  # fmt: skip
            if problems and args.strict:
                raise UserError(f"{problems[0][1]}: {problems[0][2]} (--strict)")
            skipped += len(problems)
            problem_file.write(B.problem_lines((n, r) for _, n, r in problems))
            ok = np.delete(np.arange(len(good)), [j for j, _ in failed]).astype(np.int64)
            labels = np.asarray([good[j].label for j in ok], dtype=np.int64)
            held = source.held_out(part, np.asarray([good[j].row for j in ok], dtype=np.int64))
            if "val" in writers:
                writers["val"].write(tokens[held], labels[held])
            writers[part.split].write(tokens[~held], labels[~held], view_tokens[~held] if views else None)
        problem_file.flush()
        os.fsync(problem_file.fileno())
    report = {"part": part.path, "splits": {s: w.finish() for s, w in writers.items()}, "skipped": skipped}
    B._write(tmp / "part.json", (json.dumps(report, indent=1) + "\n").encode())


# --- rank 0: every part together -------------------------------------------------------------


def wait_for_parts(work: Path, parts: list[Part], since: float) -> None:
    """Block until every part's folder exists (the other ranks convert them); reports progress while waiting.
    Raises UserError when another rank wrote that it failed (after `since`: not a killed run's old report)."""
    missing = [p for p in parts if not (work / part_name(p)).is_dir()]
    if not missing:
        return
    with tqdm(total=len(parts), initial=len(parts) - len(missing), desc="parts done (all ranks)", unit="part",
              disable=None) as bar:  # fmt: skip
        while missing:
            time.sleep(POLL_S)
            for report in work.glob("failed-rank-*.txt"):
                if report.stat().st_mtime >= since - 60:  # file-server and node clocks may differ a little
                    rank = report.stem.rsplit("-", 1)[1]
                    raise UserError(f"rank {rank} failed: {report.read_text().strip()}; fix it and rerun (finished "
                                    "parts are kept)")  # fmt: skip
            still = [p for p in missing if not (work / part_name(p)).is_dir()]
            bar.update(len(missing) - len(still))
            missing = still


def assemble(work: Path, out: Path, source: StreamSource, palette: np.ndarray, args: argparse.Namespace) -> dict:
    """Gather the parts' shard files under their final names (`<split>/shard-NNNNN`, numbered over the parts in
    order), their problems, the palette and the manifest in a temporary folder, then publish it as `out`."""
    tmp = B._sibling(out, "tmp")
    tmp.mkdir()
    try:
        splits: dict[str, dict] = {}
        with open(tmp / "problems.txt", "wb") as problem_file:
            problem_file.write(B.problem_lines(source.problems))
            skipped = len(source.problems)
            for part in source.parts:
                folder = work / part_name(part)
                report = json.loads((folder / "part.json").read_text())
                with open(folder / "problems.txt", "rb") as f:
                    shutil.copyfileobj(f, problem_file)
                skipped += report["skipped"]
                for split, written in report["splits"].items():
                    into = splits.setdefault(split, {"n": 0, "shards": []})
                    for entry in written["shards"]:
                        (tmp / split).mkdir(exist_ok=True)
                        stem = f"{split}/shard-{len(into['shards']):05d}"
                        for key, suffix in (("tokens", ".tokens"), ("labels", ".labels.npy"),
                                            ("views", ".views.tokens")):  # fmt: skip
                            if key in entry:
                                os.replace(folder / entry[key], tmp / f"{stem}{suffix}")
                                entry[key] = f"{stem}{suffix}"
                        into["shards"].append(entry)
                        into["n"] += entry["n"]
                    if written.get("views"):
                        into["views"] = written["views"]
            problem_file.flush()
            os.fsync(problem_file.fileno())
        order = [s for s in ("train", "val", "test") if splits.get(s, {}).get("n")]  # a split nothing fell to: none
        if not splits.get("train", {}).get("n"):
            raise UserError(f"none of the training images of {source.description} could be read; see "
                            f"{work}/part-*/problems.txt")  # fmt: skip
        manifest = B.write_manifest(tmp, palette, source.class_names, source.description,
                                    {s: splits[s] for s in order}, skipped, args)  # fmt: skip
        publish_dir(tmp, out, aside=B._sibling(out, "old"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
