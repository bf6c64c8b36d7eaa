"""The live probe's choices that need no process group: which images it reads, and when it turns itself off.
(Runs that log it under ZeRO-3 and the pipeline layout: test_pretrain_distributed.py.)"""

import json

import numpy as np
import pytest

from igpt_ds.config import PretrainConfig, TrainConfig
from igpt_ds.train.live_probe import choose_subset, evenly_spaced


class Split:
    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)


def config(**train) -> PretrainConfig:
    return PretrainConfig(train=TrainConfig(**train))


def test_the_subset_is_fixed_evenly_spaced_and_labelled_with_class_indices():
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9] and evenly_spaced(3, 8).tolist() == [0, 1, 2]
    train, val = Split(np.arange(1000) % 5 * 2), Split(np.arange(100) % 5 * 2)  # labels 0, 2, 4, 6, 8
    subset, why = choose_subset(config(probe_images=100, probe_val_images=20), train, val)
    assert why == "" and subset.n_classes == 5
    idx, y = subset.train
    assert len(idx) == 100 and idx[0] == 0 and idx[-1] == 999 and np.all(np.diff(idx) > 0)
    assert y.tolist() == (train.labels[idx] // 2).tolist()  # class indices 0..4, not the raw labels
    again, _ = choose_subset(config(probe_images=100, probe_val_images=20), train, val)
    assert np.array_equal(again.train[0], idx) and np.array_equal(again.val[0], subset.val[0])


def test_the_live_probe_turns_itself_off_when_it_cannot_be_honest():
    labelled = Split(np.arange(200) % 4)
    cases = {
        "train.probe_every=0": (config(probe_every=0), labelled, labelled),
        "the shards have no labels": (config(), Split(-np.ones(200)), labelled),
        "fewer than 2 classes": (config(), Split(np.zeros(200)), Split(np.zeros(50))),
        "miss a validation class": (config(), Split(np.arange(200) % 3), Split(np.arange(50) % 4)),
    }
    for reason, (cfg, train, val) in cases.items():
        subset, why = choose_subset(cfg, train, val)
        assert subset is None and reason in why, (reason, why)
    assert choose_subset(config(), labelled, labelled)[0] is not None


def test_a_resumed_run_keeps_the_probes_up_to_its_checkpoint_and_adds_up_the_overhead(tmp_path):
    import json

    from igpt_ds.train.live_probe import LiveProbe

    cfg = PretrainConfig(train=TrainConfig(run_root=str(tmp_path), name="run"))
    cfg.train.run_dir.mkdir(parents=True)
    history = [{"step": s, "val_loss": 1.0, "acc": {"0": 50.0}, "best_layer": 0, "best_acc": 50.0} for s in (0, 5, 9)]
    saved = {"history": history, "overhead": {"probe_s": 10.0, "wall_s": 100.0, "share": 0.1}}
    (cfg.train.run_dir / "live_probe.json").write_text(json.dumps(saved))
    labelled = Split(np.arange(40) % 4)
    subset, _ = choose_subset(cfg, labelled, labelled)
    probe = LiveProbe(None, cfg, (labelled, labelled), 0, 1, None, subset, start_step=5)  # resumed from step 5
    assert [h["step"] for h in probe.history] == [0, 5]  # the probe at step 9 came after the checkpoint: redone
    probe.seconds = 5.0
    probe.save(wall_s=50.0)
    report = json.loads((cfg.train.run_dir / "live_probe.json").read_text())
    assert report["overhead"] == {"probe_s": 15.0, "wall_s": 150.0, "share": 0.1}
    fresh = LiveProbe(None, cfg, (labelled, labelled), 0, 1, None, subset, start_step=0)
    assert fresh.history == [] and fresh.before["wall_s"] == 0.0  # a new run does not inherit a stale file


@pytest.mark.multiproc
def test_fitting_each_layer_on_one_rank_gives_the_data_parallel_results_with_no_collective_inside_a_fit():
    """Issue 25: the live probe's layers are gathered to owner ranks and fitted there alone. Its accuracies equal
    the data-parallel fits it replaced, at world size 1 and 2, and the fitting thread makes no collective."""
    from test_distributed import run_program

    results = {}
    for nprocs in (1, 2):
        procs = run_program("live_probe_fits", "3", nprocs=nprocs, timeout=300)
        assert all(p.returncode == 0 for p in procs), procs[0].stderr[-3000:] + procs[-1].stderr[-3000:]
        results[nprocs] = json.loads(procs[0].stdout.strip().splitlines()[-1])
    for nprocs, r in results.items():
        assert r["new"] == r["old"], (nprocs, r)  # JSON keys: the same layers, the same accuracies, exactly
        assert r["fit_collectives"] == [0] * nprocs
    assert results[1]["new"] == results[2]["new"]
    assert results[1]["owned"] == [0, 1, 2] and results[2]["owned"] == [0, 2]  # rank 0 owns layers 0 and 2 of 3
    assert len(set(results[1]["new"].values())) > 1  # the layers differ: a real comparison
