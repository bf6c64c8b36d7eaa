"""The views study's table and figures from its outputs (docs/studies/views/run.sh writes them).

Reads, under --out-root: runs/<arm>/tensorboard (train and validation loss), features/<arm>/probe/probe.json (the
linear probe of every layer, and raw pixels) for each arm. Writes into this folder: results.json, results.md,
val_loss.png (validation and training loss over pretraining, every arm), probe_layers.png (probe test accuracy by
layer, every arm, with raw pixels); and from lowdata/<arm>/probe.json (low-data probes of the crop and views8
arms): low_data.json and a copy of views8's low_data.png.

    python docs/studies/views/report.py --out-root studies_out/views
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = Path(__file__).resolve().parent
ARMS = {
    "evaluation crop (no views)": "crop",
    "8 views, paper's crops (0.58-0.875 of the short side)": "views8",
    "8 views, mild crops (0.875-1.0)": "views8-mild",
}
TRAIN_IMAGES, BATCH = 500, 64


def curves(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's TensorBoard events (the last value wins for a repeated step)."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in ("train/loss", "val/loss"):
            if tag in acc.Tags()["scalars"]:
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-root", type=Path, default=Path("studies_out/views"))
    args = p.parse_args()
    root = args.out_root
    results = {}
    for label, arm in ARMS.items():
        c = curves(root / "runs" / arm)
        val = dict(sorted(c["val/loss"].items()))
        probe = json.loads((root / "features" / arm / "probe" / "probe.json").read_text())
        results[label] = {"arm": arm, "val_loss": val, "train_loss": dict(sorted(c["train/loss"].items())),
                          "probe": probe}  # fmt: skip
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for (label, r), colour in zip(results.items(), ("tab:blue", "tab:orange", "tab:green"), strict=True):
        ax.plot(list(r["val_loss"]), list(r["val_loss"].values()), "-", color=colour, label=f"{label}: validation")
        ax.plot(list(r["train_loss"]), list(r["train_loss"].values()), ":", color=colour, alpha=0.7)
    ax.set_xlabel(f"step (batch {BATCH}; {TRAIN_IMAGES} training images: {TRAIN_IMAGES / BATCH:.1f} steps an epoch)")
    ax.set_ylabel("loss (nats/pixel); dotted: training")
    ax.set_title("Validation loss with and without augmented views")
    ax.set_ylim(top=1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "val_loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, r in results.items():
        rows = [row for row in r["probe"]["rows"] if len(row["layers"]) == 1]
        ax.plot([row["layers"][0] for row in rows], [row["test_acc"] for row in rows], "o-", label=label)
    pixels = next(row for row in next(iter(results.values()))["probe"]["rows"] if row["name"] == "pixels")
    ax.axhline(pixels["test_acc"], color="tab:gray", ls=":", label=f"raw pixels ({pixels['test_acc']:.1f}%)")
    ax.set_xlabel(f"layer (block input; {next(iter(results.values()))['probe']['n_layer']} = final norm)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title("Linear probe by layer after 1,000 steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "probe_layers.png")
    plt.close(fig)

    low = {}
    for arm in ("views8", "crop"):
        r = json.loads((root / "lowdata" / arm / "probe.json").read_text())
        keep = ("label_budgets", "repeats", "subset_seed", "c_grid")
        low[arm] = {"best_layer": r["best_layer"], "low_data": r["low_data"],
                    "settings": {k: r["settings"][k] for k in keep}}  # fmt: skip
    (HERE / "low_data.json").write_text(json.dumps(low, indent=1) + "\n")
    shutil.copy(root / "lowdata" / "views8" / "low_data.png", HERE / "low_data.png")
    (HERE / "results.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    head = ["training data", "lowest val loss (step)", "val loss at 1,000", "train loss at 1,000",
            "best layer (val)", "its test %", "last layer test %", "mean test % over layers"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        val, train = r["val_loss"], r["train_loss"]
        low = min(val, key=val.get)
        probe = r["probe"]
        per_layer = [row for row in probe["rows"] if len(row["layers"]) == 1]
        best = next(row for row in per_layer if row["layers"] == [probe["best_layer"]])
        mean = sum(row["test_acc"] for row in per_layer) / len(per_layer)
        lines.append(f"| {label} | {val[low]:.3f} ({low}) | {val[max(val)]:.3f} | {train[max(train)]:.3f} | "
                     f"{probe['best_layer']} | {best['test_acc']:.1f} | {per_layer[-1]['test_acc']:.1f} | "
                     f"{mean:.1f} |")  # fmt: skip
    lines += ["", "Test accuracy (%) by layer:", ""]
    n = len([row for row in next(iter(results.values()))["probe"]["rows"] if len(row["layers"]) == 1])
    lines += ["| training data | " + " | ".join(str(i) for i in range(n)) + " |", "|" + "---|" * (n + 1)]
    for label, r in results.items():
        accs = [row["test_acc"] for row in r["probe"]["rows"] if len(row["layers"]) == 1]
        lines.append(f"| {label} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
