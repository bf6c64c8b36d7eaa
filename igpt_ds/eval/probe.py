"""Linear probes on frozen features (docs/reference.md#evaluation), fitted by all ranks together.

For each layer: multinomial L2-regularised logistic regression on features standardised with the train
split's mean and std (never val's or test's), the inverse regularisation strength C chosen on the
validation split, accuracy reported on the test split. Beside the per-layer sweep the report holds the
concatenation of k layers around the best one (the paper's 72% iGPT-XL ImageNet trick; each column
standardised with train statistics, which is each layer standardised on its own) and a raw-pixel
baseline on the images' real channels, so one sees what pretraining bought. Layer n_layer is the final
norm's output; the best layer should be mid-depth (the curve is unimodal).

Data parallel (`igpt_ds.eval.logreg`): rank r holds rows `rank_rows(n, r, world, BLOCK_ROWS)` of each split, so memory
per rank is (N_train + N_val + N_test) / world × d × 4 B for the probe being fitted; the ranks fit every
probe together, one probe at a time, each layer read once for its whole C sweep (ascending C, each fit
warm-started from the last). With `--solver sklearn` one rank fits with scikit-learn instead (the
reference the tests compare against).

Low-data probes (`--label_budgets 40,250,4000 --repeats 5`, `igpt_ds.eval.low_data`): every per-layer probe and the
pixels again on class-balanced subsets of the train split, C chosen on the whole validation split; mean ± std of
test accuracy per budget in probe.json's "low_data", a console table and low_data.png.

Results are kept as they come: `<out>/probe.json` is rewritten after every probe (`"complete": false`
until the end), and a rerun with the same features and settings skips the probes already in it. Labels a
probe cannot use honestly (an empty split, unlabelled rows, a train or validation split with one class, val/test
classes that train lacks, splits from different label sets, test = train or val) are refused before
any fitting: one line, exit 2.

    python launcher/linear_probe.py --features demo_out/features
    deepspeed --num_gpus 8 launcher/linear_probe.py --features runs/igpt-l/features
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt_ds.atomic import write_text
from igpt_ds.config import ConfigError
from igpt_ds.data.sampler import rank_rows
from igpt_ds.distributed import process_group
from igpt_ds.distributed.process_group import init_distributed, rank_and_world
from igpt_ds.distributed.rank0 import check_output, gather_objects, on_rank0
from igpt_ds.eval import logreg
from igpt_ds.eval.feature_store import FeatureSplit
from igpt_ds.eval.low_data import SubsetSplit, balanced_subset, digest, summarise
from igpt_ds.eval.plots import plot_low_data, plot_probe

SOLVERS = ("torch", "sklearn")
SPLITS = ("train", "val", "test")


@dataclass
class ProbeResult:
    name: str
    """'layer 3', 'final norm (4)', 'concat 1-5' or 'pixels'."""
    layers: list[int]
    """Layers whose features were probed (empty for the raw-pixel baseline)."""
    dim: int
    C: float
    """Inverse L2 strength chosen on validation."""
    val_acc: float
    test_acc: float
    """Percent."""
    converged: bool
    """False if the solver hit max_iter at the chosen C."""
    seconds: float = 0.0
    """Wall time of the whole C sweep, reading included."""


def window(layers: list[int], best: int, k: int) -> list[int]:
    """k consecutive entries of `layers` centred on `best`, shifted inward at the ends."""
    i = layers.index(best)
    k = min(k, len(layers))
    start = min(max(i - k // 2, 0), len(layers) - k)
    return layers[start : start + k]


Splits = dict[str, FeatureSplit]
"""'train', 'val', 'test' -> extracted split."""


def check_labels(splits: Splits, names: dict[str, str]) -> np.ndarray:
    """The classes a probe fits (sorted labels present in train), after refusing every arrangement of labels
    it could not fit or score honestly; ConfigError (one line naming the split and the way out) otherwise."""
    where = {k: f"the {k} split ({s.path})" for k, s in splits.items()}
    if names["test"] in (names["train"], names["val"]):
        other = "train" if names["test"] == names["train"] else "val"
        raise ConfigError(
            f"test_split={names['test']} is also the {other} split: its accuracy would not be held out; "
            f"set --test_split to a split the probe neither fits nor selects on"
        )
    for k, s in splits.items():
        if s.n == 0:
            raise ConfigError(f"{where[k]} has no images; extract features of a non-empty split")
        if (s.labels < 0).any():
            raise ConfigError(f"{where[k]} has {int((s.labels < 0).sum())} unlabelled images; the probe needs a "
                              "label for each: build the shards from a labelled source")  # fmt: skip
        n_names = len(s.meta.get("class_names", []))
        if n_names and s.labels.max() >= n_names:
            raise ConfigError(f"{where[k]} has labels up to {int(s.labels.max())} but {n_names} class names; "
                              "rebuild the shards")  # fmt: skip
    class_lists = {k: s.meta.get("class_names", []) for k, s in splits.items()}
    if any(v != class_lists["train"] for v in class_lists.values()):
        odd = next(k for k, v in class_lists.items() if v != class_lists["train"])
        raise ConfigError(f"{where[odd]} and the train split name different classes: extract every split from "
                          "the same shard folder")  # fmt: skip
    classes = np.unique(splits["train"].labels)
    label = lambda c: class_lists["train"][c] if c < len(class_lists["train"]) else str(c)
    if len(classes) < 2:
        raise ConfigError(
            f"{where['train']} holds one class ({label(int(classes[0]))}); a probe needs at least two: check "
            "that every class folder of the source has images and rebuild the shards"
        )
    held = np.unique(splits["val"].labels)
    if len(held) < 2:
        raise ConfigError(
            f"{where['val']} holds one class ({label(int(held[0]))}): C would be chosen on that class's accuracy "
            "alone; give a validation split with several classes (igpt-build-shards --val-fraction)"
        )
    for k in ("val", "test"):
        unseen = np.setdiff1d(np.unique(splits[k].labels), classes)
        if len(unseen):
            shown = ", ".join(label(int(c)) for c in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise ConfigError(
                f"{where[k]} holds {len(unseen)} classes the train split lacks ({shown}); the probe can never "
                "predict them: rebuild the shards so train has images of every class (e.g. a larger train split)"
            )
    return classes


def check_layers(splits: Splits, layers: list[int]) -> list[int]:
    """`layers` (empty = all extracted), each present in train, val and test."""
    layers = layers or splits["train"].layers
    missing = [l for l in layers if any(l not in s.layers for s in splits.values())]
    if missing:
        raise ConfigError(
            f"layers {missing} are not extracted for all of train/val/test (have {splits['train'].layers})"
        )
    return layers


class ProbeTask:
    """One probe: the feature columns it reads (layers side by side, or 'pixels'), and its name."""

    def __init__(self, what: list[int] | str, n_layer: int):
        self.what = what
        if what == "pixels":
            self.name, self.layers = "pixels", []
        elif len(what) == 1:
            self.name = f"final norm ({what[0]})" if what[0] == n_layer else f"layer {what[0]}"
            self.layers = list(what)
        else:
            self.name, self.layers = f"concat {what[0]}-{what[-1]}", list(what)

    def rows(self, split: FeatureSplit, rows: range) -> np.ndarray:
        """This rank's rows of the task's columns, float32 (len(rows), dim), read part by part in place."""
        if self.what == "pixels":
            return split.read("pixels", rows, out=np.empty((len(rows), split.width("pixels")), np.float32))
        d = split.width(self.layers[0])
        out = np.empty((len(rows), d * len(self.layers)), np.float32)
        for j, l in enumerate(self.layers):
            split.read(l, rows, out=out[:, j * d : (j + 1) * d])
        return out


def run_task(
    task: ProbeTask, splits: Splits, classes: np.ndarray, c_grid: list[float], solver: str, max_iter: int,
    patience: int = 0,
) -> ProbeResult:  # fmt: skip
    """Fit the task's probe on every rank's rows for each C (ascending, warm-started); keep the C with the best
    validation accuracy (ties: stronger L2) and report its test accuracy. With `patience`, stop after that many
    C values in a row without a better validation accuracy. Collective (the accuracies, hence the stop, are the
    same on every rank)."""
    tic = time.perf_counter()
    rank, world = rank_and_world()
    device = process_group.device()  # the GPU of this rank where there is one, else the CPU
    data = {}
    for k, s in splits.items():
        mine = rank_rows(s.n, rank, world, logreg.BLOCK_ROWS)
        x = torch.from_numpy(task.rows(s, mine)).to(device)
        target = torch.from_numpy(np.searchsorted(classes, s.labels[mine.start : mine.stop])).to(device)
        data[k] = (x, target, s.n)
    check_finite(task, splits, {k: x for k, (x, _, _) in data.items()})
    scaler = logreg.Scaler.fit(data["train"][0], data["train"][2])  # train statistics only, for every split
    for x, _, _ in data.values():
        scaler.apply_(x)
    (x_tr, y_tr, n_tr), dim = data["train"], data["train"][0].shape[1]
    accuracy = lambda model, k: 100.0 * logreg.correct(data[k][0], data[k][1], model) / data[k][2]
    if solver == "sklearn":
        fit_at = lambda C, warm: logreg.fit_sklearn(x_tr, y_tr, len(classes), C, max_iter)
    else:
        basis = logreg.Basis.fit(x_tr, n_tr)  # once per probe: preconditions every C
        fit_at = lambda C, warm: logreg.fit(x_tr, y_tr, len(classes), n_tr, C, max_iter, warm, basis=basis)
    model, C, val_acc = logreg.sweep_c(fit_at, c_grid, lambda m: accuracy(m, "val"), patience)
    best = ProbeResult(task.name, task.layers, dim, C, val_acc, accuracy(model, "test"), model.converged)
    best.seconds = time.perf_counter() - tic
    return best


def check_finite(task: ProbeTask, splits: Splits, rows: dict[str, torch.Tensor]) -> None:
    """ConfigError, on every rank, when any split's rows of the task's columns hold a NaN or an infinity: on train
    they would poison the fit, on val or test they would be scored as wrong answers, a lower accuracy reported
    as a result. One pass over the rows in memory and one all-reduce of 3 counts, per probe. Collective."""
    bad = torch.stack([(~torch.isfinite(x)).any(dim=1).sum() for x in rows.values()]).to(torch.float64)
    counts = logreg.all_reduce(bad.to(process_group.collective_device())).tolist()
    for s, n_bad in zip(splits.values(), counts, strict=True):
        if n_bad:
            raise ConfigError(f"{s.path}: {int(n_bad)} of {s.n} rows hold non-finite features ({task.name}); "
                              "extract them again (--precision=fp32 if bf16 overflowed; a diverged checkpoint "
                              "gives NaN everywhere) before probing")  # fmt: skip


def make_report(
    splits: Splits, rows: list[ProbeResult], settings: dict, complete: bool, low_rows: list[ProbeResult] | None = None
) -> dict:
    """The JSON-ready report: per-layer rows in layer order, then concatenation and pixels; with low-data rows,
    their summary ("low_data": budget -> probe -> mean, std over the subsets) and the rows themselves."""
    train = splits["train"]
    per_layer = sorted((r for r in rows if len(r.layers) == 1), key=lambda r: r.layers[0])
    n_classes = len(train.meta["class_names"]) or len(np.unique(train.labels))
    return {
        "complete": complete,
        "checkpoint": train.meta.get("checkpoint", ""),
        "settings": settings,
        "c_grid": settings["c_grid"],
        "solver": settings["solver"],
        "best_layer": max(per_layer, key=lambda r: r.val_acc).layers[0] if per_layer else None,
        "n_layer": train.meta["n_layer"],
        "chance": 100.0 / n_classes,
        "n": {k: s.n for k, s in splits.items()},
        "rows": [asdict(r) for r in [*per_layer, *(r for r in rows if len(r.layers) != 1)]],
        **(
            {"low_data": low_data_summary(low_rows), "low_data_rows": [asdict(r) for r in low_rows]} if low_rows else {}
        ),  # fmt: skip
    }


def format_table(report: dict) -> str:
    """Console table: one line per probe, the best layer starred, chance underneath."""
    lines = [f"{'probe':<20} {'dim':>6} {'C':>8} {'val %':>7} {'test %':>7}"]
    for r in report["rows"]:
        star = " *" if r["layers"] == [report["best_layer"]] else ""
        flag = " (not converged)" if not r["converged"] else ""
        lines.append(
            f"{r['name']:<20} {r['dim']:>6} {r['C']:>8.0e} {r['val_acc']:>7.2f} {r['test_acc']:>7.2f}{star}{flag}"
        )
    lines.append(f"chance {report['chance']:.1f}%; * = best layer on validation; solver {report['solver']}")
    if report.get("low_data"):
        budgets = list(report["low_data"])
        lines += ["", "low-data test % (mean ± std over the subsets), by labels:",
                  f"{'probe':<20} " + " ".join(f"{b:>14}" for b in budgets)]  # fmt: skip
        for task in report["low_data"][budgets[0]]:
            cells = [report["low_data"][b].get(task) for b in budgets]
            lines.append(f"{task:<20} " + " ".join(f"{c['mean']:>7.2f} ± {c['std']:<4.2f}" if c else f"{'':>14}"
                                                   for c in cells))  # fmt: skip
    return "\n".join(lines)


@dataclass
class ProbeConfig:
    """Linear probes on extracted features (launcher/linear_probe.py)."""

    features: str = "demo_out/features"
    """Folder written by extract_features: one subfolder per split."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    layers: list[int] = field(default_factory=list)
    """Layers to probe (empty = every extracted layer)."""
    solver: str = "auto"
    """'torch' (data-parallel full-batch L-BFGS on every rank, GPU when present), 'sklearn' (scikit-learn's
    L-BFGS, one rank only: the reference), 'auto' (= torch)."""
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    """Inverse L2 strengths tried; the best on validation is kept."""
    c_patience: int = 2
    """Stop a probe's ascending C sweep after this many C values in a row without a better validation accuracy
    (0 = fit every C). Validation accuracy against C rises then falls in practice, and the largest C values
    (the weakest regularisation) are the slowest fits."""
    concat_k: int = 5
    """Layers concatenated around the best one (paper's iGPT-XL: 5); 0 or 1 skips it."""
    pixels: bool = True
    """Fit the raw-pixel baseline too."""
    label_budgets: list[int] = field(default_factory=list)
    """Low-data probes: class-balanced train subsets of these many labels (the paper: 40, 250, 4000 on CIFAR-10),
    each `repeats` times, for every per-layer probe and the pixels; empty = none."""
    repeats: int = 5
    """Random subsets per label budget (the paper: 5); the report gives mean ± std over them."""
    subset_seed: int = 0
    """Seed of the subsets (with the budget and the repeat number): the same rows at any world size."""
    max_iter: int = 1000
    out: str = ""
    """Report folder (probe.json, probe.png, tensorboard/); empty = <features>/probe."""
    dist_timeout_s: int = 600

    def __post_init__(self) -> None:
        if self.solver not in (*SOLVERS, "auto"):
            raise ConfigError(f"solver={self.solver!r} must be one of {[*SOLVERS, 'auto']}")
        if not self.c_grid or min(self.c_grid) <= 0 or self.max_iter < 1 or min(self.concat_k, self.c_patience) < 0:
            raise ConfigError("c_grid must hold positive values, max_iter >= 1, concat_k >= 0, c_patience >= 0")
        if self.repeats < 1 or any(b < 1 for b in self.label_budgets):
            raise ConfigError("repeats must be >= 1 and every label_budgets entry >= 1")


def linear_probe(cfg: ProbeConfig) -> dict:
    """Probe every layer, the concatenation around the best and the raw pixels, all ranks together; rank 0
    writes the table, probe.json (after every probe), probe.png and TensorBoard scalars. Returns the report
    on rank 0 ({} elsewhere)."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    solver = "torch" if cfg.solver == "auto" else cfg.solver
    if solver == "sklearn" and world > 1:
        raise ConfigError("solver=sklearn fits on one rank; run one process, or use --solver=torch on several")
    names = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    out = Path(cfg.out or Path(cfg.features) / "probe")
    check_output(out, "--out")

    def prepare() -> tuple[list[int], list[float], list[dict], list[dict]]:
        """Rank 0 checks the features and labels and reads the probes a previous run finished, for all ranks."""
        splits = {k: FeatureSplit(Path(cfg.features) / v) for k, v in names.items()}
        layers = check_layers(splits, cfg.layers)
        classes = check_labels(splits, names)
        for b in cfg.label_budgets:  # every subset drawable, before any fit
            balanced_subset(splits["train"].labels, classes, b, cfg.subset_seed, 0)
        done, done_low = [], []
        if (out / "probe.json").is_file():
            previous = json.loads((out / "probe.json").read_text())
            if previous.get("settings") == settings(cfg, splits, layers, solver):
                done, done_low = previous["rows"], previous.get("low_data_rows", [])
        return layers, classes.tolist(), done, done_low

    layers, classes, done_rows, done_low = on_rank0(prepare)
    splits = {k: FeatureSplit(Path(cfg.features) / v) for k, v in names.items()}
    classes = np.asarray(classes)
    setup = settings(cfg, splits, layers, solver)
    rows = [ProbeResult(**r) for r in done_rows]
    low_rows = [ProbeResult(**r) for r in done_low]
    n_layer = splits["train"].meta["n_layer"]

    # Every subset drawn once (the same on every rank: from the labels alone), for all its probes and subsets.json.
    subsets = {(b, r): balanced_subset(splits["train"].labels, classes, b, cfg.subset_seed, r)
               for b in cfg.label_budgets for r in range(cfg.repeats)}  # fmt: skip

    def run(task: ProbeTask, budget: int = 0, repeat: int = 0) -> None:
        name = task.name if not budget else low_data_name(task.name, budget, repeat)
        kept = low_rows if budget else rows
        if any(r.name == name for r in kept):
            return
        data = splits
        if budget:
            data = {**splits, "train": SubsetSplit(splits["train"], subsets[budget, repeat])}
        result = run_task(task, data, classes, cfg.c_grid, solver, cfg.max_iter, cfg.c_patience)
        result.name = name
        kept.append(result)
        if rank == 0:
            print(f"{result.name}: val {result.val_acc:.2f}% test {result.test_acc:.2f}% (C={result.C:g}, "
                  f"{result.seconds:.1f} s)", flush=True)  # fmt: skip
            report = make_report(splits, rows, setup, False, low_rows)
            write_text(out / "probe.json", json.dumps(report, indent=2) + "\n")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if rows:
            print(f"resuming: {len(rows)} probes already in {out / 'probe.json'}", flush=True)
    for l in layers:
        run(ProbeTask([l], n_layer))
    best = max((r for r in rows if len(r.layers) == 1), key=lambda r: r.val_acc).layers[0]
    group = window(layers, best, cfg.concat_k)
    if len(group) > 1:
        run(ProbeTask(group, n_layer))
    if cfg.pixels:
        run(ProbeTask("pixels", n_layer))
    if cfg.label_budgets and rank == 0:
        write_subsets(out / "subsets.json", subsets, cfg.subset_seed)
    for budget in cfg.label_budgets:
        for repeat in range(cfg.repeats):
            for task in [ProbeTask([l], n_layer) for l in layers] + ([ProbeTask("pixels", n_layer)] if cfg.pixels
                                                                     else []):  # fmt: skip
                run(task, budget, repeat)
    peak = gather_objects(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank != 0:
        return {}
    report = make_report(splits, rows, setup, True, low_rows)
    report["peak_rss_bytes"] = peak
    write_report(report, out)
    return report


def settings(cfg: ProbeConfig, splits: Splits, layers: list[int], solver: str) -> dict[str, Any]:
    """What a probe's result depends on besides its columns: a rerun with equal settings reuses finished rows."""
    return {
        "features": {
            k: {"path": str(s.path.resolve()), "n": s.n, "source": s.meta.get("source")} for k, s in splits.items()
        },  # fmt: skip
        "layers": layers,
        "c_grid": sorted(cfg.c_grid),
        "solver": solver,
        "max_iter": cfg.max_iter,
        "c_patience": cfg.c_patience,
        "concat_k": cfg.concat_k,
        "label_budgets": list(cfg.label_budgets),
        "repeats": cfg.repeats,
        "subset_seed": cfg.subset_seed,
    }


def low_data_name(task: str, budget: int, repeat: int) -> str:
    return f"{task} | {budget} labels | subset {repeat}"


def low_data_summary(low_rows: list[ProbeResult]) -> dict[str, dict[str, dict]]:
    """{budget: {probe name: {mean, std, n, test_acc: [per subset], C: [per subset]}}} of the low-data rows."""
    out: dict[str, dict[str, dict]] = {}
    for r in low_rows:
        task, budget, _ = r.name.split(" | ")
        entry = out.setdefault(budget.split()[0], {}).setdefault(task, {"test_acc": [], "C": []})
        entry["test_acc"].append(r.test_acc)
        entry["C"].append(r.C)
    for per_task in out.values():
        for entry in per_task.values():
            entry.update(summarise(entry["test_acc"]))
    return out


def write_subsets(path: Path, subsets: dict[tuple[int, int], np.ndarray], seed: int) -> None:
    """The train rows of every low-data subset ((budget, repeat) -> rows), with their sha256: what each mean ± std
    was fitted on."""
    out: dict[str, list] = {}
    for (b, r), rows in subsets.items():
        out.setdefault(str(b), []).append({"repeat": r, "rows": rows.tolist(), "sha256": digest(rows)})
    write_text(path, json.dumps({"seed": seed, "subsets": out}) + "\n")


def write_report(report: dict, out: Path) -> None:
    """Console table, probe.json, probe.png and TensorBoard scalars (probe/*_acc by layer)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    write_text(out / "probe.json", json.dumps(report, indent=2) + "\n")
    plot_probe(report, out / "probe.png")
    if report.get("low_data"):
        plot_low_data(report, out / "low_data.png")
    writer = SummaryWriter(str(out / "tensorboard"))
    for r in report["rows"]:
        if len(r["layers"]) == 1:
            writer.add_scalar("probe/val_acc", r["val_acc"], r["layers"][0])
            writer.add_scalar("probe/test_acc", r["test_acc"], r["layers"][0])
        else:
            writer.add_scalar(f"probe/{'pixels' if r['name'] == 'pixels' else 'concat'}_test_acc", r["test_acc"], 0)
    writer.close()
    print(f"report: {out / 'probe.json'}, plot: {out / 'probe.png'}, tensorboard: {out / 'tensorboard'}")
