"""Linear probes on frozen features (Chen et al. 2020, §3.4, §4.2 and Figure 3).

For each layer: multinomial L2-regularised logistic regression on standardised features (mean and
std from the train split), the inverse regularisation strength C chosen on the validation split,
accuracy reported on the test split. Two solvers minimise the same objective,

    mean cross-entropy + ||W||² / (2·C·n_train)      (bias unregularised; scikit-learn's convention)

- `sklearn`: scikit-learn's L-BFGS, as the paper;
- `torch`: full-batch L-BFGS with strong-Wolfe line search in torch, on the GPU when there is one,
  for feature sets too large for a CPU solver. It agrees with scikit-learn within 0.5 points (tested).

Beside the per-layer sweep the report holds the concatenation of k layers around the best one (the
paper's 72% iGPT-XL ImageNet trick) and a raw-pixel baseline, so one sees what pretraining bought.
Layer n_layer is the final norm's output; the best layer should be mid-depth (the curve is unimodal).

    python launcher/linear_probe.py --features demo_out/features
    deepspeed --num_gpus 8 launcher/linear_probe.py --features runs/igpt-l/features --solver torch
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from igpt_ds.atomic import write_text
from igpt_ds.config import ConfigError
from igpt_ds.distributed import barrier, init_distributed
from igpt_ds.features import FeatureSplit, gather_objects
from igpt_ds.plots import plot_probe

SOLVERS = ("sklearn", "torch")


@dataclass
class ProbeResult:
    name: str
    """'layer 3', 'final norm (layer 4)', 'concat 1-5' or 'pixels'."""
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


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """float32 copies of all arrays, centred and scaled by the train split's mean and std."""
    train = np.asarray(train, dtype=np.float32)
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0  # constant features (e.g. always-white corners) stay zero instead of dividing by 0
    scale = lambda x: ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)
    return [scale(train), *(scale(x) for x in others)]


@dataclass
class Fit:
    predict: Callable[[np.ndarray], np.ndarray]
    converged: bool
    """False if the solver stopped at max_iter."""
    warm: Any
    """Solver state that starts the fit at the next C from this solution (valid until that fit)."""


def fit_sklearn(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, warm: Any = None) -> Fit:
    """scikit-learn's multinomial L-BFGS logistic regression, warm-started from `warm` (a previous Fit's)."""
    clf = warm or LogisticRegression(solver="lbfgs", max_iter=max_iter, tol=1e-6, warm_start=True)
    clf.set_params(C=C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return Fit(clf.predict, converged, clf)


def fit_torch(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, warm: Any = None) -> Fit:
    """Full-batch torch L-BFGS (strong-Wolfe line search) on scikit-learn's objective; GPU when present."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # fp64 on CPU matches scikit-learn's precision; fp32 on GPU, where large feature sets live.
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    xt = torch.as_tensor(x, device=device, dtype=dtype)
    yt = torch.as_tensor(y, device=device, dtype=torch.long)
    n, d = xt.shape
    classes = torch.unique(yt)
    target = torch.searchsorted(classes, yt)  # labels -> 0..K-1, as scikit-learn does internally
    if warm is None:
        warm = (
            torch.zeros(d, len(classes), device=device, dtype=dtype),
            torch.zeros(len(classes), device=device, dtype=dtype),
        )
    W, b = (t.detach().clone().requires_grad_() for t in warm)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ W + b, target) + (W * W).sum() / (2 * C * n)
        loss.backward()
        return loss

    opt.step(closure)
    converged = opt.state[opt._params[0]]["n_iter"] < max_iter

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = torch.as_tensor(features, device=device, dtype=dtype) @ W + b
        return classes[logits.argmax(dim=1)].cpu().numpy()

    return Fit(predict, converged, (W.detach(), b.detach()))


def probe(
    name: str,
    layers: list[int],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    c_grid: list[float],
    solver: str = "sklearn",
    max_iter: int = 1000,
) -> ProbeResult:
    """Standardise; fit on train for each C (ascending, each warm-started from the last); keep the C with
    the best validation accuracy (ties: stronger L2) and report its test accuracy."""
    if solver not in SOLVERS:
        raise ConfigError(f"solver={solver!r} must be one of {SOLVERS}")
    fitter = fit_sklearn if solver == "sklearn" else fit_torch
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train, val, test
    x_tr, x_va, x_te = standardise(x_tr, x_va, x_te)
    accuracy = lambda fit, x, y: 100.0 * float((fit.predict(x) == y).mean())
    best, warm = None, None
    for C in sorted(c_grid):
        fit = fitter(x_tr, y_tr, C, max_iter, warm)
        warm, val_acc = fit.warm, accuracy(fit, x_va, y_va)
        if best is None or val_acc > best.val_acc:
            # Test is scored for the candidate now (the next fit reuses the solver state); it picks nothing.
            best = ProbeResult(name, layers, x_tr.shape[1], C, val_acc, accuracy(fit, x_te, y_te), fit.converged)
    return best


def window(layers: list[int], best: int, k: int) -> list[int]:
    """k consecutive entries of `layers` centred on `best`, shifted inward at the ends."""
    i = layers.index(best)
    k = min(k, len(layers))
    start = min(max(i - k // 2, 0), len(layers) - k)
    return layers[start : start + k]


Splits = dict[str, FeatureSplit]
"""'train', 'val', 'test' -> extracted split."""


def probe_splits(
    splits: Splits, name: str, layers: list[int], get: Callable[[FeatureSplit], np.ndarray], **kwargs
) -> ProbeResult:
    """`probe` on the features `get` reads from each split (kwargs: c_grid, solver, max_iter)."""
    data = [(get(splits[s]), splits[s].labels) for s in ("train", "val", "test")]
    return probe(name, layers, *data, **kwargs)


def layer_task(splits: Splits, task: int | str, **kwargs) -> ProbeResult:
    """One independent probe: a layer number, or 'pixels' for the raw-pixel baseline."""
    if task == "pixels":
        return probe_splits(splits, "pixels", [], lambda s: s.pixels(), **kwargs)
    n_layer = splits["train"].meta["n_layer"]
    name = f"final norm ({task})" if task == n_layer else f"layer {task}"
    return probe_splits(splits, name, [task], lambda s: s.layer(task), **kwargs)


def concat_task(splits: Splits, group: list[int], **kwargs) -> ProbeResult:
    """The paper's k-layer concatenation: each layer standardised on its own, then side by side."""
    stack = lambda s: np.concatenate([standardise(s.layer(l))[0] for l in group], axis=1)
    return probe_splits(splits, f"concat {group[0]}-{group[-1]}", group, stack, **kwargs)


def check_layers(splits: Splits, layers: list[int]) -> list[int]:
    """`layers` (empty = all extracted), each present in train, val and test."""
    layers = layers or splits["train"].layers
    missing = [l for l in layers if any(l not in s.layers for s in splits.values())]
    if missing:
        raise ConfigError(
            f"layers {missing} are not extracted for all of train/val/test (have {splits['train'].layers})"
        )
    return layers


def make_report(splits: Splits, per_layer: list[ProbeResult], extra: list[ProbeResult], solver: str,
                c_grid: list[float]) -> dict:  # fmt: skip
    """The JSON-ready report: per-layer rows in layer order, then concatenation and pixels."""
    train = splits["train"]
    n_classes = len(train.meta["class_names"]) or int(train.labels.max()) + 1
    return {
        "checkpoint": train.meta.get("checkpoint", ""),
        "solver": solver,
        "c_grid": sorted(c_grid),
        "best_layer": max(per_layer, key=lambda r: r.val_acc).layers[0],
        "n_layer": train.meta["n_layer"],
        "chance": 100.0 / n_classes,
        "n": {k: len(s.labels) for k, s in splits.items()},
        "rows": [asdict(r) for r in [*sorted(per_layer, key=lambda r: r.layers[0]), *extra]],
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
    return "\n".join(lines)


@dataclass
class ProbeConfig:
    features: str = "demo_out/features"
    """Folder written by extract_features: one subfolder per split."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    layers: list[int] = field(default_factory=list)
    """Layers to probe (empty = every extracted layer)."""
    solver: str = "auto"
    """'sklearn' (L-BFGS, as the paper), 'torch' (full-batch L-BFGS, GPU when present), 'auto' (torch on GPU)."""
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    """Inverse L2 strengths tried; the best on validation is kept."""
    concat_k: int = 5
    """Layers concatenated around the best one (paper's iGPT-XL: 5); 0 or 1 skips it."""
    max_iter: int = 1000
    out: str = ""
    """Report folder (probe.json, probe.png, tensorboard/); empty = <features>/probe."""
    dist_timeout_s: int = 600

    def __post_init__(self) -> None:
        if self.solver not in (*SOLVERS, "auto"):
            raise ConfigError(f"solver={self.solver!r} must be one of {[*SOLVERS, 'auto']}")
        if not self.c_grid or min(self.c_grid) <= 0 or self.max_iter < 1 or self.concat_k < 0:
            raise ConfigError("c_grid must hold positive values, max_iter >= 1, concat_k >= 0")


def linear_probe(cfg: ProbeConfig) -> dict:
    """Probe every layer and the raw pixels (ranks share them out), then rank 0 probes the concatenation
    around the best layer and writes the table, probe.json, probe.png and TensorBoard scalars."""
    rank, world = init_distributed(cfg.dist_timeout_s)
    solver = cfg.solver if cfg.solver != "auto" else ("torch" if torch.cuda.is_available() else "sklearn")
    names = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    splits = {k: FeatureSplit(Path(cfg.features) / v) for k, v in names.items()}
    layers = check_layers(splits, cfg.layers)
    kwargs = dict(c_grid=cfg.c_grid, solver=solver, max_iter=cfg.max_iter)
    mine = []
    for task in [*layers, "pixels"][rank::world]:
        mine.append(layer_task(splits, task, **kwargs))
        print(f"[rank {rank}] {mine[-1].name}: val {mine[-1].val_acc:.2f}% test {mine[-1].test_acc:.2f}%", flush=True)
    results = [r for part in gather_objects(mine) for r in part]
    if rank != 0:
        barrier()
        return {}
    per_layer = [r for r in results if r.layers]
    pixels = [r for r in results if not r.layers]
    best = max(per_layer, key=lambda r: r.val_acc).layers[0]
    group = window(layers, best, cfg.concat_k)
    concat = [concat_task(splits, group, **kwargs)] if len(group) > 1 else []
    report = make_report(splits, per_layer, concat + pixels, solver, cfg.c_grid)
    write_report(report, Path(cfg.out or Path(cfg.features) / "probe"))
    barrier()
    return report


def write_report(report: dict, out: Path) -> None:
    """Console table, probe.json, probe.png and TensorBoard scalars (probe/*_acc by layer)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    print(format_table(report))
    write_text(out / "probe.json", json.dumps(report, indent=2) + "\n")
    plot_probe(report, out / "probe.png")
    writer = SummaryWriter(str(out / "tensorboard"))
    for r in report["rows"]:
        if len(r["layers"]) == 1:
            writer.add_scalar("probe/val_acc", r["val_acc"], r["layers"][0])
            writer.add_scalar("probe/test_acc", r["test_acc"], r["layers"][0])
        else:
            writer.add_scalar(f"probe/{'pixels' if r['name'] == 'pixels' else 'concat'}_test_acc", r["test_acc"], 0)
    writer.close()
    print(f"report: {out / 'probe.json'}, plot: {out / 'probe.png'}, tensorboard: {out / 'tensorboard'}")
