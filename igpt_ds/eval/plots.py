"""Figures of the evaluation entry points: the probe curve (Chen et al. 2020, Figure 3) and image grids
(Figure 1's completions). PNG files via matplotlib (headless backend) and Pillow.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from igpt_ds.atomic import atomic_file

TITLE_HEIGHT = 12
"""Pixels of the header band that holds column titles (PIL's default bitmap font is ~11 px)."""


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """`fig` laid out, written to `path` as a PNG atomically, and closed."""
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


def plot_probe(report: dict, path: str | Path) -> Path:
    """Validation and test accuracy against layer, with the concatenation, raw pixels and chance."""
    per_layer = [r for r in report["rows"] if len(r["layers"]) == 1]
    layers = [r["layers"][0] for r in per_layer]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(layers, [r["test_acc"] for r in per_layer], "o-", label="test")
    ax.plot(layers, [r["val_acc"] for r in per_layer], "s--", alpha=0.6, label="validation")
    for r in report["rows"]:
        if r["name"] == "pixels":
            ax.axhline(r["test_acc"], color="tab:gray", ls=":", label=f"raw pixels (test {r['test_acc']:.1f}%)")
        elif len(r["layers"]) > 1:
            mid = (r["layers"][0] + r["layers"][-1]) / 2
            ax.errorbar(mid, r["test_acc"], xerr=(r["layers"][-1] - r["layers"][0]) / 2, fmt="*", ms=12,
                        color="tab:red", label=f"{r['name']} (test {r['test_acc']:.1f}%)")  # fmt: skip
    ax.axhline(report["chance"], color="k", lw=0.8, alpha=0.4, label="chance")
    ax.set_xlabel(f"layer (block input; {report['n_layer']} = final norm)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xticks(layers)
    ax.set_title("Linear probe accuracy by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_low_data(report: dict, path: str | Path) -> Path:
    """Low-data probes: test accuracy (mean ± std over the subsets) against labels, for the best layer (on full
    validation), the final norm and the raw pixels."""
    budgets = [int(b) for b in report["low_data"]]
    n, b = report["n_layer"], report["best_layer"]
    best, last = (f"final norm ({n})" if b == n else f"layer {b}"), f"final norm ({n})"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    styles = {best: "o-"}
    styles.setdefault(last, "s--")
    styles["pixels"] = "^:"
    for task, style in styles.items():
        cells = [report["low_data"][str(b)].get(task) for b in budgets]
        if all(cells):
            ax.errorbar(budgets, [c["mean"] for c in cells], yerr=[c["std"] for c in cells], fmt=style, capsize=3,
                        label=f"{task}{' (best layer)' if task == best else ''}")  # fmt: skip
    ax.axhline(report["chance"], color="k", lw=0.8, alpha=0.4, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("labelled training images (class-balanced subsets)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title("Low-data linear probes (mean ± std over subsets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def live_probe_layers(acc: dict[int, float], chance: float, n_layer: int, step: int) -> plt.Figure:
    """The live probe at one step: validation accuracy against layer (the paper's Figure 3, one curve)."""
    layers = sorted(acc)
    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    ax.plot(layers, [acc[l] for l in layers], "o-")
    best = max(layers, key=lambda l: acc[l])
    ax.plot([best], [acc[best]], "*", ms=14, color="tab:red", label=f"best: layer {best} ({acc[best]:.1f}%)")
    ax.axhline(chance, color="k", lw=0.8, alpha=0.4, label="chance")
    ax.set_xlabel(f"layer (block input; {n_layer} = final norm)")
    ax.set_ylabel("probe accuracy on validation (%)")
    ax.set_title(f"Live linear probe at step {step}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def live_probe_history(history: list[dict], chance: float, path: str | Path | None = None) -> plt.Figure:
    """Best live-probe accuracy against validation loss over a run (one point per probe, labelled by step), and
    both against step: representation quality rising as the generative loss falls (the paper's Figure 3)."""
    steps = [h["step"] for h in history]
    loss = [h["val_loss"] for h in history]
    best = [h["best_acc"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=110)
    left.plot(loss, best, "o-")
    for x, y, s in zip(loss, best, steps, strict=True):
        left.annotate(str(s), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.invert_xaxis()  # training moves right: loss falls
    left.set_xlabel("validation loss (nats/pixel)")
    left.set_ylabel("best-layer probe accuracy (%)")
    left.axhline(chance, color="k", lw=0.8, alpha=0.4, label="chance")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(steps, best, "o-", color="tab:blue", label="best-layer probe accuracy (%)")
    right.set_xlabel("step")
    right.set_ylabel("probe accuracy (%)", color="tab:blue")
    twin = right.twinx()
    twin.plot(steps, loss, "s--", color="tab:orange", alpha=0.8)
    twin.set_ylabel("validation loss (nats/pixel)", color="tab:orange")
    right.grid(alpha=0.3)
    fig.suptitle("Live linear probe over the run")
    fig.tight_layout()
    if path is not None:
        with atomic_file(path) as f:
            fig.savefig(f, format="png")
    return fig


def image_grid(columns: list[np.ndarray], scale: int = 1, gap: int = 1, titles: list[str] = ()) -> np.ndarray:
    """Tile columns of images, each (N, H, W, 3) uint8, into one (rows·H', cols·W', 3) picture.

    Images are enlarged `scale`× by pixel repetition (8×8 images are unreadable otherwise) and
    separated by `gap` white pixels; `titles` label the columns in a header band.
    """
    n, h, w, _ = columns[0].shape
    H, W = h * scale, w * scale
    grid = np.full((n * (H + gap) - gap, len(columns) * (W + gap) - gap, 3), 255, dtype=np.uint8)
    for c, images in enumerate(columns):
        big = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H, W, 3)
        for r in range(n):
            grid[r * (H + gap) : r * (H + gap) + H, c * (W + gap) : c * (W + gap) + W] = big[r]
    if not titles:
        return grid
    header = Image.new("RGB", (grid.shape[1], TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for c, title in enumerate(titles):
        draw.text((c * (W + gap) + 2, 1), title, fill=(0, 0, 0))
    return np.concatenate([np.asarray(header), grid])


def save_png(image: np.ndarray, path: str | Path) -> Path:
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")
    return Path(path)
