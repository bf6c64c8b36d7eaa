"""The evaluation story on the embedded digits through the real entry points, as `make demo` tells it:
shards -> short pretraining (launcher/pretrain.py, ZeRO-3) -> features of every layer -> probe table with
the raw-pixel baseline -> completions grid -> fine-tuning that beats its starting validation accuracy."""

import json

import numpy as np
import pytest
import torch
from eval_support import check, run_entry
from pretrain_support import digits_shards, run_ranks, scalars, write_config
from test_probe import sklearn_reference

from igpt_ds.checkpoint import export
from igpt_ds.checkpoint.weights import load_consolidated
from igpt_ds.eval.feature_store import FeatureSplit


@pytest.mark.multiproc
def test_digits_pretrain_probe_sample_finetune(tmp_path):
    shards = digits_shards(tmp_path / "shards")
    config = write_config(tmp_path / "pretrain.yaml", shards, tmp_path / "runs", n_vocab=512, global_batch=32,
                          micro_batch=32, max_steps=150, log_every=50, eval_every=150, save_every=150)  # fmt: skip
    run_ranks(config, nprocs=1, log_dir=tmp_path)
    run = tmp_path / "runs" / "run"

    features = tmp_path / "features"
    extract = ("extract_features", "--checkpoint", str(run), "--shards", str(shards), "--out", str(features))
    check(run_entry(*extract, nprocs=2))  # from the ZeRO-3 run: rank 0 consolidates it once for both ranks
    assert load_consolidated(features / "weights")[0].n_layer == 2
    table = check(run_entry("linear_probe", "--features", str(features), nprocs=2))  # ranks share the layers
    report = json.loads((features / "probe" / "probe.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["layer 0", "layer 1", "final norm (2)", "concat 0-2", "pixels"], names
    assert all(name in table for name in names)
    per_layer = [r for r in report["rows"] if len(r["layers"]) == 1]
    assert max(r["test_acc"] for r in per_layer) > 4 * report["chance"]  # chance is 10%
    assert_picture(features / "probe" / "probe.png")
    assert "probe/test_acc" in scalars(features / "probe" / "tensorboard")
    # The demo's features: one rank fits what two fit, and scikit-learn agrees at each chosen C.
    check(run_entry("linear_probe", "--features", str(features), "--out", str(tmp_path / "probe1")))
    one = json.loads((tmp_path / "probe1" / "probe.json").read_text())
    for a, b in zip(report["rows"], one["rows"], strict=True):
        assert a["name"] == b["name"] and a["C"] == b["C"], (a, b)
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.1 and abs(a["test_acc"] - b["test_acc"]) <= 0.1, (a, b)
    splits = [FeatureSplit(features / s) for s in ("train", "val", "test")]
    for row in report["rows"][:3]:
        data = [(s.read(row["layers"][0], range(s.n)), s.labels) for s in splits]
        reference = sklearn_reference(*data, row["C"])
        assert abs(row["val_acc"] - reference[0]) <= 0.5 and abs(row["test_acc"] - reference[1]) <= 0.5, row

    samples = tmp_path / "samples"
    check(run_entry("sample", "--checkpoint", str(run), "--shards", str(shards), "--out", str(samples),
                    "--n_images", "3", "--n_completions", "2", "--n_unconditional", "4", "--top_k", "8",
                    nprocs=2))  # fmt: skip
    tokens = np.load(samples / "tokens.npz")
    assert tokens["completions"].shape == (6, 64) and tokens["unconditional"].shape == (4, 64)
    np.testing.assert_array_equal(tokens["completions"][:, :32], np.repeat(tokens["originals"][:, :32], 2, axis=0))
    assert_picture(samples / "completions.png")
    assert_picture(samples / "unconditional.png")
    assert list((samples / "tensorboard").glob("events.out.tfevents.*"))

    preset = "launcher/configs/finetune_digits_cpu.yaml"
    check(run_entry("finetune", "--config", preset, f"--data.shards={shards}", f"--train.init_from={run}",
                    f"--train.run_root={tmp_path / 'runs'}", "--train.max_steps=60", "--train.eval_every=20",
                    "--train.micro_batch=32", "--train.ds_config=ds_configs/cpu.json"))  # fmt: skip
    results = json.loads((tmp_path / "runs" / "digits-finetune" / "results.json").read_text())
    assert results["best"]["val_acc"] > results["start_val_acc"] + 10, results
    # The pretrained ZeRO-3 run was exported once, by rank 0, to the weights every rank read lazily.
    cfg, weights, palette = load_consolidated(tmp_path / "runs" / "digits-finetune" / "init_weights")
    assert cfg.n_layer == 2 and palette is not None
    assert torch.equal(weights["wte.weight"], export.load_model_for_eval(run)[0].wte.weight)


def assert_picture(path):
    """A PNG that decodes, larger than one 8x8 digit, with more than one colour (not a blank canvas)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 8, (path, image.size)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 1, path
