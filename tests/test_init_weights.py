"""Initial weights arrive exactly, and once: `checkpoint.weights.load_weights` after `deepspeed.initialize`.

`train.init_from` and a fine-tuning backbone used to be copied into bf16 parameters before the engine was built, so
DeepSpeed made the fp32 master weights from the rounded copy: "export, then init_from" into a bf16 run lost the low
16 bits of every weight. Now every engine's masters (ZeRO-0's FP16_UnfusedOptimizer copies, ZeRO 1-3 partitions,
the pipeline's bf16 optimizer) hold the file's fp32 values bit for bit, and the bf16 parameters their rounding.
With several ranks rank 0 alone reads the file and broadcasts each tensor (tests/test_distributed.py counts it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from eval_support import separable_shards
from pretrain_support import in_process_rank, write_config

from igpt_ds.checkpoint.weights import fp32_masters, igpt_parameters, save_consolidated
from igpt_ds.config import ModelConfig, PretrainConfig, load_config
from igpt_ds.models.igpt import IGPT

CFG = ModelConfig(size="igpt-tiny", n_px=8, n_vocab=8)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("init")
    separable_shards(work / "shards")
    torch.manual_seed(0)
    # Values bf16 cannot hold: a rounded copy differs from them in nearly every element.
    state = {k: torch.randn_like(v) * 0.1 + 1e-3 for k, v in IGPT(CFG).state_dict().items()}
    save_consolidated(work / "weights", CFG, state)
    return work


@pytest.fixture(scope="module")
def rank():
    with in_process_rank():
        yield


def masters(engine) -> dict[str, torch.Tensor]:
    """IGPT name -> the fp32 weights the optimizer steps (the parameter itself when it is fp32)."""
    copies = fp32_masters(engine)
    out = {}
    for name, param in igpt_parameters(engine.module).items():
        got = safe_get_full_fp32_param(param)
        out[name] = (got if got is not None else copies.get(id(param), param)).detach().float().cpu()
    return out


def policy(work: Path, stage: int, pipeline: bool = False) -> str:
    cfg = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if pipeline:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    path = work / f"bf16_{stage}_{pipeline}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def expected(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(work / "weights" / "model.safetensors")


@pytest.mark.parametrize("layout", ["zero0", "zero1", "zero2", "zero3", "pipeline"])
def test_init_from_gives_bf16_runs_the_exact_fp32_masters(layout, work, rank):
    from igpt_ds.train.pretrain import setup

    stage, pipeline = (1, True) if layout == "pipeline" else (int(layout[-1]), False)
    config = write_config(work / f"{layout}.yaml", work / "shards", work / "runs", 8)
    overrides = [f"--train.name={layout}", f"--train.ds_config={policy(work, stage, pipeline)}",
                 f"--train.init_from={work / 'weights'}"]  # fmt: skip
    overrides += ["--train.layout=pipeline"] if pipeline else []
    run = setup(load_config(PretrainConfig, config, overrides))
    run.reader.close()
    want, got = expected(work), masters(run.engine)
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name}: the master is not the file's fp32 value"
    params = igpt_parameters(run.engine.module)
    if layout != "zero3":  # a ZeRO-3 parameter holds its partition only
        assert all(torch.equal(p.detach().cpu(), want[n].to(torch.bfloat16)) for n, p in params.items())


@pytest.mark.parametrize("stage", [1, 3])
def test_a_fine_tuning_backbone_arrives_exactly(stage, work, rank):
    from igpt_ds.train.finetune import FinetuneConfig, Finetuner

    cfg = load_config(FinetuneConfig, None, [
        f"--train.init_from={work / 'weights'}", f"--data.shards={work / 'shards'}", f"--train.run_root={work}",
        f"--train.name=ft{stage}", f"--train.ds_config={policy(work, stage)}", "--train.global_batch=16",
        "--train.micro_batch=8"])  # fmt: skip
    tuner = Finetuner(cfg)
    tuner.reader.close()
    want, got = expected(work), masters(tuner.engine)
    assert set(got) - set(want) == {"clf_head.weight"} and not got["clf_head.weight"].any()  # OpenAI's zero head
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.multiproc
@pytest.mark.parametrize("ds_config", ["ds_configs/cpu.json", "ds_configs/cpu_zero3.json"])
def test_two_ranks_read_start_up_files_once(ds_config, work):
    """What every rank read at start-up from shared storage, now read by rank 0 alone (or shared out) and sent to
    the others: the consolidated weights (M bytes: M x R before, M now), git's answer, every shard file's size and
    every label file (train and val), and with data.verify_checksums each file hashed by one rank, not by all."""
    from test_distributed import run_program

    from igpt_ds.data.shards import ShardSplit

    results = run_program("startup_reads", str(work), ds_config)
    n = len(expected(work))
    out = []
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        out.append(result.stdout.strip().splitlines()[-2:])
    (hashed0, line0), (hashed1, line1) = out
    assert line0.startswith(f"init_from {n} tensors, eval {n} tensors, ") and " 2 git, " in line0, line0
    assert line1.startswith("init_from 0 tensors, eval 0 tensors, 0 headers, 0 git, 0 stats, 0 label files"), line1
    assert line0.split("sum ")[1] == line1.split("sum ")[1]
    files = [name for split in ("train", "val") for name, _ in ShardSplit(work / "shards", split).files()]
    by_rank = [eval(h.removeprefix("hashed ")) for h in (hashed0, hashed1)]  # noqa: S307 - our own print
    assert by_rank[0] and by_rank[1] and sorted(by_rank[0] + by_rank[1]) == sorted(files)  # each file once a split


@pytest.mark.multiproc
def test_zero3_masters_of_parameters_that_do_not_split_evenly(work):
    """3 ranks, 32-wide parameters: DeepSpeed's own setter sliced past the end on the last rank and crashed; every
    master is the file's value."""
    from test_distributed import run_program

    policy(work, 3)  # bf16_3_False.json
    (work / "z3bf16.json").write_text((work / "bf16_3_False.json").read_text())
    for result in run_program("zero3_masters", str(work), nprocs=3, timeout=240):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == "masters exact: True"
