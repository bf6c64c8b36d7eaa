"""The mnist5k study's figures and tables from its outputs (docs/studies/mnist5k/run.sh writes them).

Reads, under --out-root: runs/mnist5k-{ar,bert}/live_probe.json (the live probe over pretraining),
features/mnist5k-{ar,bert}/probe/probe.json (the offline linear probe of every layer, and raw pixels),
runs/mnist5k-ft{,-clf}/results.json (fine-tuning with L_CLF + L_GEN, and with L_CLF alone). Writes into this
folder: results.json, results.md, live_probe.png (best probe accuracy against validation loss, AR and BERT),
probe_layers.png (offline probe accuracy by layer, AR and BERT, with raw pixels), and copies of each run's own
live_probe.png.

    python docs/studies/mnist5k/report.py --out-root studies_out/mnist5k
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"AR": "mnist5k-ar", "BERT": "mnist5k-bert"}
FINETUNES = {
    "L_CLF + L_GEN (OpenAI's head)": "mnist5k-ft",
    "L_CLF alone (OpenAI's head)": "mnist5k-ft-clf",
    "L_CLF + L_GEN, standardised features": "mnist5k-ft-std",
}
BERT_MASKS = {"unmasked (bert_masks=0)": "mnist5k-bert-m0", "1 mask (default)": "mnist5k-bert",
              "mean of 4 masks": "mnist5k-bert-m4"}  # fmt: skip


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-root", type=Path, default=Path("studies_out/mnist5k"))
    args = p.parse_args()
    root = args.out_root
    live = {k: load(root / "runs" / v / "live_probe.json") for k, v in RUNS.items()}
    probe = {k: load(root / "features" / v / "probe" / "probe.json") for k, v in RUNS.items()}
    finetune = {k: load(root / "runs" / v / "results.json") for k, v in FINETUNES.items()}
    masks = {k: load(root / "features" / v / "probe" / "probe.json") for k, v in BERT_MASKS.items()}
    results = {"live_probe": live, "probe": probe, "finetune": finetune, "bert_masks": masks}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for k, v in RUNS.items():
        shutil.copy(root / "runs" / v / "live_probe.png", HERE / f"live_probe_{k.lower()}.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for k, rep in live.items():
        hist = rep["history"]
        ax.plot([h["val_loss"] for h in hist], [h["best_acc"] for h in hist], "o-", label=k)
    ax.invert_xaxis()
    ax.set_xlabel("validation loss (nats/pixel; AR and BERT losses are not comparable)")
    ax.set_ylabel("best-layer live probe accuracy (%)")
    ax.set_title("Live probe against validation loss over pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "live_probe.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for k, rep in probe.items():
        rows = [r for r in rep["rows"] if len(r["layers"]) == 1]
        ax.plot([r["layers"][0] for r in rows], [r["test_acc"] for r in rows], "o-", label=f"{k} (test)")
    pixels = next(r for r in probe["AR"]["rows"] if r["name"] == "pixels")
    ax.axhline(pixels["test_acc"], color="tab:gray", ls=":", label=f"raw pixels ({pixels['test_acc']:.1f}%)")
    n_layer = probe["AR"]["n_layer"]
    ax.set_xlabel(f"layer (block input; {n_layer} = final norm)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title("Linear probe by layer after pretraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "probe_layers.png")
    plt.close(fig)

    (HERE / "results.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    head = ["model", "best layer (val)", "its test %", "last layer test %", "raw pixels test %",
            "live probe: first -> last best %", "val loss first -> last"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, rep in results["probe"].items():
        rows = {r["name"]: r for r in rep["rows"]}
        per_layer = [r for r in rep["rows"] if len(r["layers"]) == 1]
        best = next(r for r in per_layer if r["layers"] == [rep["best_layer"]])
        last = per_layer[-1]
        hist = results["live_probe"][k]["history"]
        lines.append(f"| {k} | {rep['best_layer']} of 0..{rep['n_layer']} | {best['test_acc']:.1f} | "
                     f"{last['test_acc']:.1f} | {rows['pixels']['test_acc']:.1f} | "
                     f"{hist[0]['best_acc']:.1f} -> {hist[-1]['best_acc']:.1f} | "
                     f"{hist[0]['val_loss']:.3f} -> {hist[-1]['val_loss']:.3f} |")  # fmt: skip
    lines += ["", "| fine-tuning (AR model) | best val % | its test % | at step |", "|---|---|---|---|"]
    for k, r in results["finetune"].items():
        b = r["best"]
        lines.append(f"| {k} | {b['val_acc']:.1f} | {b['test_acc']:.1f} | {b['step']} |")
    lines += ["", "| BERT features | best layer (val) | its test % | concat test % |", "|---|---|---|---|"]
    for k, rep in results["bert_masks"].items():
        best = next(r for r in rep["rows"] if r["layers"] == [rep["best_layer"]])
        concat = next((r for r in rep["rows"] if r["name"].startswith("concat")), None)
        lines.append(f"| {k} | {rep['best_layer']} | {best['test_acc']:.1f} | "
                     f"{concat['test_acc'] if concat else float('nan'):.1f} |")  # fmt: skip
    overhead = {k: v.get("overhead", {}) for k, v in results["live_probe"].items()}
    lines += ["", "| live probe cost | probe s | run wall s | share |", "|---|---|---|---|"]
    for k, o in overhead.items():
        if o:
            lines.append(f"| {k} | {o['probe_s']:.0f} | {o['wall_s']:.0f} | {o['share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
