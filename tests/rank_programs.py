"""Small programs that the distributed tests run as several ranks (`python tests/rank_programs.py NAME ...`),
each started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT like torchrun would. Not collected by pytest."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from igpt_ds.checkpoint import ds_checkpoint, export
from igpt_ds.checkpoint.weights import save_consolidated
from igpt_ds.config import ConfigError, ModelConfig
from igpt_ds.distributed.process_group import barrier, shutdown
from igpt_ds.distributed.rank0 import on_rank0
from igpt_ds.models.igpt import IGPT


def init_distributed(timeout: int) -> int:
    """A gloo process group whose collectives time out after `timeout` s, started only once every rank is up
    (a rendezvous on a store of its own with a generous timeout), so that a slow start on a loaded machine
    never counts against the short timeout under test. Returns the rank."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["SYNC_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=300))  # fmt: skip
    store.add("up", 1)
    while int(store.add("up", 0)) < world:
        time.sleep(0.05)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return rank


def slow_on_rank0(delay: float, timeout: int) -> None:
    """Rank 0 works `delay` seconds while the others wait for it through on_rank0."""
    init_distributed(timeout)
    print(on_rank0(lambda: time.sleep(delay) or "rank 0 finished"), flush=True)


def slow_then_barrier(delay: float, timeout: int) -> None:
    """The pattern on_rank0 replaces: rank 0 works while the others wait in a barrier."""
    rank = init_distributed(timeout)
    if rank == 0:
        time.sleep(delay)
    barrier()
    print("passed the barrier", flush=True)


def config_error_on_rank0(timeout: int) -> None:
    init_distributed(timeout)

    def bad() -> None:
        raise ConfigError("rank 0 found a bad input")

    try:
        on_rank0(bad)
    except ConfigError as e:
        print(f"ConfigError: {e}", flush=True)


def slow_consolidation(root: str, delay: float, timeout: int) -> None:
    """consolidated_for_ranks on a DeepSpeed-style checkpoint folder whose export takes `delay` seconds."""
    init_distributed(timeout)
    ckpt, out = Path(root) / "step_00000003", Path(root) / "export"

    def export_consolidated(path, out_dir):
        time.sleep(delay)
        model = IGPT(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=16), seed=0)
        meta = {"source": str(Path(path).resolve()), "step": ds_checkpoint.read_meta(Path(path))["step"]}
        return save_consolidated(out_dir, model.cfg, model.state_dict(), None, meta)

    export.export_consolidated = export_consolidated
    model, cfg, _ = export.load_model_for_ranks(ckpt, out)
    print(f"loaded {cfg.n_layer} layers from {json.loads((out / 'config.json').read_text())['source']}", flush=True)


def device_binding(visible: int) -> None:
    """`process_group.init_distributed` through DeepSpeed's real start-up under a fake CUDA accelerator that
    shows `visible` devices; prints the device DeepSpeed handed to init_process_group (its eager NCCL start-up), the
    device bound and LOCAL_RANK after. gloo carries the collectives."""
    import deepspeed
    import torch
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from igpt_ds.distributed.process_group import init_distributed as start

    class FakeCuda(CPU_Accelerator):
        def __init__(self):
            super().__init__()
            self._name, self.bound = "cuda", []

        def device_name(self, index=None):
            return "cuda" if index is None else f"cuda:{index}"

        def device_count(self):
            return visible

        def set_device(self, index):
            self.bound.append(int(index))

        def device(self, index=None):
            return torch.device("cuda", int(index or 0))

        def communication_backend_name(self):
            return "gloo"

    fake = FakeCuda()
    set_accelerator(fake)
    handed = []
    real = torch.distributed.init_process_group

    @functools.wraps(real)  # DeepSpeed passes device_id only to a function whose signature has it
    def init_process_group(backend, **kwargs):
        handed.append(str(kwargs.pop("device_id", None)))
        return real(backend, **kwargs)  # gloo on the CPU: no device to bind

    torch.distributed.init_process_group = init_process_group
    rank, world = start(60)
    assert deepspeed.comm.is_initialized()
    print(f"rank {rank} of {world}: device_id {handed[0]}, bound {fake.bound}, LOCAL_RANK {os.environ['LOCAL_RANK']}")


def startup_reads(work: str, ds_config: str) -> None:
    """Pretraining's start-up with train.init_from and data.verify_checksums, then evaluation's model loading, on
    every rank; prints what this rank read of shared storage: tensors and headers of the consolidated weights, git
    processes, shard files stat'ed, label files loaded, files hashed; and a checksum of the loaded model."""
    from igpt_ds.checkpoint import weights
    from igpt_ds.config import PretrainConfig, load_config
    from igpt_ds.data import shards
    from igpt_ds.train import run_folder
    from igpt_ds.train.pretrain import setup

    counts = dict.fromkeys(("tensors", "headers", "git", "stats", "labels"), 0)
    hashed: list[str] = []

    def counting(key, real):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        return wrapper

    weights.TensorFile.__getitem__ = counting("tensors", weights.TensorFile.__getitem__)
    weights.TensorFile.__init__ = counting("headers", weights.TensorFile.__init__)
    shards.ShardSplit._check = counting("stats", shards.ShardSplit._check)
    shards.ShardSplit._load_labels = counting("labels", shards.ShardSplit._load_labels)
    real_hash, real_run = shards.sha256_file, run_folder.subprocess.run
    root = Path(work)
    shards.sha256_file = lambda path, *a: (
        hashed.append(str(Path(path).relative_to(root / "shards"))) or real_hash(path, *a)
    )
    run_folder.subprocess.run = lambda cmd, *a, **k: (counts.__setitem__("git", counts["git"] + (cmd[0] == "git"))
                                                          or real_run(cmd, *a, **k))  # fmt: skip
    cfg = load_config(PretrainConfig, None, [
        "--model.size=igpt-tiny", "--model.n_px=8", "--model.n_vocab=8", f"--data.shards={root / 'shards'}",
        "--data.verify_checksums=true", f"--train.run_root={root / 'runs'}", f"--train.ds_config={ds_config}",
        "--train.global_batch=16", "--train.micro_batch=4", f"--train.init_from={root / 'weights'}",
        "--train.probe_every=0"])  # fmt: skip
    run = setup(cfg)
    run.reader.close()
    trained = counts["tensors"]
    model, _, _ = export.load_model_for_ranks(root / "weights", root / "export")
    total = sum(float(p.double().sum()) for p in model.parameters())
    print(f"hashed {sorted(hashed)}", flush=True)
    print(
        f"init_from {trained} tensors, eval {counts['tensors'] - trained} tensors, {counts['headers']} headers, "
        f"{counts['git']} git, {counts['stats']} stats, {counts['labels']} label files, sum {total:.6f}",
        flush=True,
    )


def zero3_masters(work: str) -> None:
    """train.init_from into a bf16 ZeRO-3 engine on every rank (3 ranks: igpt-tiny's 32-wide parameters do not split
    evenly); prints whether the gathered fp32 masters equal the file's values exactly."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from igpt_ds.config import PretrainConfig, load_config
    from igpt_ds.train.pretrain import setup

    root = Path(work)
    policy = root / "z3bf16.json"  # written by the test
    cfg = load_config(PretrainConfig, None, [
        "--model.size=igpt-tiny", "--model.n_px=8", "--model.n_vocab=8", f"--data.shards={root / 'shards'}",
        f"--train.run_root={root / 'runs3'}", f"--train.ds_config={policy}", "--train.global_batch=12",
        "--train.micro_batch=4", f"--train.init_from={root / 'weights'}", "--train.probe_every=0"])  # fmt: skip
    run = setup(cfg)
    run.reader.close()
    want = load_file(root / "weights" / "model.safetensors")
    exact = all(
        torch.equal(safe_get_full_fp32_param(p).cpu(), want[n]) for n, p in run.engine.module.named_parameters()
    )
    print(f"masters exact: {exact}", flush=True)


def save_twice(root: str, rank1_blind: int) -> None:
    """A 2-rank ZeRO-1 engine saves step 1, then saves step 1 again (a rerun of a finished run) with rank 1, when
    `rank1_blind`, seeing no `complete` marker (a stale listing of a network filesystem)."""
    import deepspeed
    import torch

    from igpt_ds.config import ModelConfig, OptimConfig, TrainConfig
    from igpt_ds.train.engine import build_ds_config, initialize

    init_distributed(20)
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    train = TrainConfig(ds_config="ds_configs/cpu.json", global_batch=2, micro_batch=1)
    engine = initialize(IGPT(ModelConfig(size="igpt-tiny", n_px=4, n_vocab=8), seed=0),
                        build_ds_config(train, OptimConfig(), 2), OptimConfig(), 10)  # fmt: skip
    ckpts = Path(root) / "checkpoints"
    ds_checkpoint.save(engine, ckpts, 1, {"step": 1}, {}, None, keep=2)
    if int(os.environ["RANK"]) == 1 and rank1_blind:
        real = Path.is_file
        Path.is_file = lambda self: False if self.name == ds_checkpoint.COMPLETE else real(self)
    before = torch.load(ckpts / "step_00000001" / "rng_rank00000.pt", weights_only=False)["torch"]
    ds_checkpoint.save(engine, ckpts, 1, {"step": 1}, {}, None, keep=2)
    barrier()
    after = torch.load(ckpts / "step_00000001" / "rng_rank00000.pt", weights_only=False)["torch"]
    print(f"saved twice; rewritten: {not torch.equal(before, after)}", flush=True)


def save_on_a_disk_that_fills(root: str) -> None:
    """A 1-rank ZeRO-1 engine saves step 1 under `root` (a small tmpfs), then the disk is filled by another writer
    and step 2 is saved; prints JSON: the RunError's line, `latest`, the complete checkpoints."""
    import deepspeed

    from igpt_ds.config import ModelConfig, OptimConfig, RunError, TrainConfig
    from igpt_ds.train.engine import build_ds_config, initialize

    init_distributed(60)
    deepspeed.init_distributed(dist_backend="gloo")
    train = TrainConfig(ds_config="ds_configs/cpu.json", global_batch=1, micro_batch=1)
    engine = initialize(IGPT(ModelConfig(size="igpt-tiny", n_px=8, n_vocab=512), seed=0),
                        build_ds_config(train, OptimConfig(), 1), OptimConfig(), 10)  # fmt: skip
    ckpts = Path(root) / "checkpoints"
    ds_checkpoint.save(engine, ckpts, 1, {"step": 1}, {}, None, keep=2)
    with open(Path(root) / "another_job", "wb") as f:  # fills the disk to its last block
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError:
            pass
        os.truncate(f.name, os.path.getsize(f.name) - 200_000)  # leaves 200 KB: the model file fits, the rest not
    try:
        ds_checkpoint.save(engine, ckpts, 2, {"step": 2}, {}, None, keep=2)  # as if the room check had passed
        error = "saved"
    except RunError as e:
        error = str(e)
    complete = sorted(p.name for p in ckpts.glob("step_*") if (p / ds_checkpoint.COMPLETE).is_file())
    print(json.dumps({"error": error, "latest": (ckpts / ds_checkpoint.LATEST).read_text(), "complete": complete}))
    shutdown()


def pretrain_ranks(config: str, overrides: str, rank1_overrides: str, rank1_blind: int) -> None:
    """launcher/pretrain.py's job on this rank, with `rank1_overrides` added on rank 1 and, when `rank1_blind`,
    rank 1 seeing no checkpoint at all (a stale listing of the checkpoint folder on a network filesystem)."""
    import os

    from igpt_ds.cli import main
    from igpt_ds.config import PretrainConfig
    from igpt_ds.train.pretrain import train

    rank = int(os.environ["RANK"])
    if rank == 1 and rank1_blind:
        ds_checkpoint.latest = lambda root: None
    argv = ["--config", config, *overrides.split(), *(rank1_overrides.split() if rank == 1 else [])]
    code = main(PretrainConfig, train, "pretrain", argv, error_prefix="igpt-pretrain: error")
    print(f"rank {rank} exit {code}", flush=True)
    sys.exit(code)


def live_probe_fits(layers: int) -> None:
    """The live probe's fits two ways on the same features, as `layers` layers of 600 + 300 rows shared out among
    the ranks: before issue 25 (every layer fitted by all ranks together, an all-reduce per L-BFGS evaluation) and
    now (`LiveProbe.gather_to_owners` + `fit_owned`: each layer whole on one rank). Prints, on rank 0, both layers'
    accuracies, the weights of a LOCAL fit against a data-parallel one, and how many collectives the fitting
    thread made."""
    import threading
    from types import SimpleNamespace

    import numpy as np
    import torch

    from igpt_ds.data.sampler import rank_rows
    from igpt_ds.eval import logreg
    from igpt_ds.train import live_probe as lp

    rank, world = init_distributed(120), int(os.environ["WORLD_SIZE"])
    rng = np.random.default_rng(0)
    means = rng.normal(scale=0.7, size=(4, 16))
    y = {"train": rng.integers(0, 4, 600), "val": rng.integers(0, 4, 300)}
    feats = {}
    for k, n in (("train", 600), ("val", 300)):
        whole = {l: torch.from_numpy((means[y[k]] * (l + 1) + rng.normal(size=(n, 16))).astype(np.float32))
                 for l in range(layers)}  # fmt: skip
        mine = rank_rows(n, rank, world, logreg.BLOCK_ROWS)
        feats[k] = ({l: x[mine.start : mine.stop] for l, x in whole.items()}, None, n)
    probe = lp.LiveProbe.__new__(lp.LiveProbe)
    probe.engine, probe.pipeline, probe.layers = SimpleNamespace(device=torch.device("cpu")), False, list(range(layers))
    probe.rank, probe.dp, probe.dp_rank = rank, world, rank
    probe.subset = lp.Subset((np.arange(600), y["train"]), (np.arange(300), y["val"]), 4)

    def before(layer: int) -> float:  # the data-parallel fit this change replaced, on this rank's rows
        x_tr, x_va = feats["train"][0][layer].clone(), feats["val"][0][layer].clone()
        mine_tr, mine_va = (
            rank_rows(600, rank, world, logreg.BLOCK_ROWS),
            rank_rows(300, rank, world, logreg.BLOCK_ROWS),
        )
        y_tr = torch.from_numpy(y["train"][mine_tr.start : mine_tr.stop])
        y_va = torch.from_numpy(y["val"][mine_va.start : mine_va.stop])
        scaler = logreg.Scaler.fit(x_tr, 600)
        scaler.apply_(x_tr)
        scaler.apply_(x_va)
        basis = logreg.Basis.fit(x_tr, 600)
        fit_at = lambda C, warm: logreg.fit(x_tr, y_tr, 4, 600, C, lp.MAX_ITER, warm, basis=basis)
        return logreg.sweep_c(fit_at, lp.C_GRID, lambda m: 100.0 * logreg.correct(x_va, y_va, m) / 300)[2]

    old = {l: before(l) for l in range(layers)}
    calls = []
    for name in ("all_reduce", "all_gather", "broadcast", "gather", "reduce", "all_gather_object"):
        real = getattr(dist, name)

        def counted(*a, _real=real, _name=name, **k):
            if threading.current_thread().name == "igpt-every-rank-work":
                calls.append(_name)
            return _real(*a, **k)

        setattr(dist, name, counted)
    owned = probe.gather_to_owners(feats, None)
    new = {}
    for part in lp.on_every_rank(lambda: probe.fit_owned(owned), poll_s=0.1):
        new.update(part)
    counts = lp.on_every_rank(lambda: len(calls))
    if rank == 0:
        print(json.dumps({"old": old, "new": {int(k): v for k, v in new.items()}, "owned": sorted(owned),
                          "fit_collectives": counts}), flush=True)  # fmt: skip


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    program = globals()[name]
    kinds = program.__annotations__
    try:
        program(*(float(a) if kinds[k] == "float" else int(a) if kinds[k] == "int" else a
                  for k, a in zip(list(kinds)[: len(args)], args, strict=True)))  # fmt: skip
        if dist.is_initialized():
            # Every rank done before any tears its group down: a rank still working (printing its result) when a
            # peer's gloo sockets close can abort ('terminate called without an active exception', exit 134).
            dist.barrier()
    finally:
        shutdown()  # as every entry point does: exiting with a live gloo group can abort (exit 134)
