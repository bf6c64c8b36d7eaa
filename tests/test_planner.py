"""The capacity planner against DeepSpeed's own memory estimators and against bytes measured on the CPU.

- ZeRO-3 model states (bf16 parameters + fp32 gradient accumulation + fp32 master + Adam, plus one
  gathered layer) agree with `estimate_zero3_model_states_mem_needs` within 10% (the acceptance line
  of issue 6), with and without offload, from 1 GPU to 1024; ZeRO-2 with its zero2 twin.
- Model states after a backward pass of a real DeepSpeed engine (1 CPU rank, bf16), counted tensor by
  tensor, agree with the planner within 2%; activations kept for backward by a real model agree
  with the planner's itemisation.
"""

import gc
import json
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from pretrain_support import REPO

from igpt_ds.config import ConfigError, ModelConfig, load_config
from igpt_ds.models.igpt import IGPT
from igpt_ds.plan import shards as shards_plan
from igpt_ds.plan.memory import BF16, FP32, Knobs, Layout, Shape, activation_bytes_per_token, memory
from igpt_ds.plan.shards import ShardCost
from igpt_ds.plan.training import ClusterConfig, PlanConfig, estimate, plan

PRESETS = [("igpt-s", 32), ("igpt-m", 32), ("igpt-l", 32), ("igpt-xl", 64)]
CLUSTERS = [(1, 1), (8, 1), (8, 8), (8, 128)]  # (GPUs per node, nodes): 1 to 1024 GPUs
FP32_ACCUM = Knobs(grad_accum_bytes=FP32)


def test_shape_counts_like_deepspeed():
    cfg = ModelConfig(size="igpt-mini", n_px=8)
    assert model_to_params(IGPT(cfg)) == (Shape.of(cfg).params, Shape.of(cfg).largest_layer)


@pytest.mark.parametrize("size,n_px", PRESETS)
@pytest.mark.parametrize("offload", ["none", "optimizer", "param"])
def test_zero3_model_states_agree_with_deepspeed_estimator(size, n_px, offload):
    shape = Shape.of(ModelConfig(size=size, n_px=n_px))
    for per_node, nodes in CLUSTERS:
        gpus = per_node * nodes
        ours = memory(shape, Layout(3, offload=offload), gpus, 1, FP32_ACCUM)
        _, theirs, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, per_node, nodes,
            cpu_offload=offload != "none", cpu_offload_params=offload == "param", zero_init=True,
        )  # fmt: skip
        assert ours["model_states"] == pytest.approx(theirs, rel=0.10), (size, offload, gpus)


@pytest.mark.parametrize("size,n_px", PRESETS)
def test_zero2_model_states_agree_with_deepspeed_estimator(size, n_px):
    # DeepSpeed's ZeRO-2 figure counts the bf16 gradients and the fp32 copy the step makes of them.
    shape = Shape.of(ModelConfig(size=size, n_px=n_px))
    knobs = Knobs(grad_accum_bytes=BF16, fused_optimizer=True)
    for per_node, nodes in CLUSTERS:
        ours = memory(shape, Layout(2), per_node * nodes, 1, knobs)
        _, theirs = estimate_zero2_model_states_mem_needs(shape.params, per_node, nodes, cpu_offload=False)
        assert ours["model_states"] + ours["step_transient"] == pytest.approx(theirs, rel=0.10)


def test_bf16_accumulation_saves_two_bytes_per_partitioned_parameter():
    shape = Shape.of(ModelConfig(size="igpt-s"))
    fp32 = memory(shape, Layout(3), 8, 1, FP32_ACCUM)["model_states"]
    bf16 = memory(shape, Layout(3), 8, 1, Knobs(grad_accum_bytes=BF16))["model_states"]
    assert fp32 - bf16 == pytest.approx(2 * shape.params / 8)


# Measured: a real DeepSpeed engine on one CPU rank, tensors counted after a backward pass.
MEASURED_CASES = [  # (ZeRO stage, gradient accumulation dtype)
    (1, "bf16"),
    (2, "bf16"),
    (3, "bf16"),
    (3, "fp32"),
    (1, "fp32"),
]
MEASURED_MODEL = dict(n_layer=2, n_embd=256, n_head=4, n_px=8)
MEASURED_BUCKET = 100_000


def _live_tensor_bytes() -> dict[int, int]:
    gc.collect()
    return {
        o.untyped_storage().data_ptr(): o.untyped_storage().nbytes()
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and o.device.type == "cpu"
    }


def _measure(tmp: str) -> dict[str, int]:
    """Run in a child process: bytes DeepSpeed holds after backward, per MEASURED_CASES entry."""
    from igpt_ds.config import OptimConfig, TrainConfig
    from igpt_ds.distributed.process_group import init_distributed
    from igpt_ds.models.objectives import objective_loss
    from igpt_ds.train.engine import build_ds_config, initialize, model_init_context

    init_distributed(600)
    cfg = ModelConfig(**MEASURED_MODEL)
    out = {}
    for stage, accum in MEASURED_CASES:
        policy = {
            "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": accum},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": MEASURED_BUCKET},
        }
        path = f"{tmp}/policy.json"
        with open(path, "w") as f:
            json.dump(policy, f)
        ds_config = build_ds_config(TrainConfig(ds_config=path, global_batch=2, micro_batch=2), OptimConfig(), 1)
        before = _live_tensor_bytes()
        with model_init_context(ds_config):
            model = IGPT(cfg)
        engine = initialize(model, ds_config, OptimConfig(), total_steps=10)
        tokens = torch.randint(0, cfg.n_vocab, (2, cfg.seq_len))
        engine.backward(objective_loss(engine(tokens), tokens, None))
        engine.step()  # creates the Adam moments
        engine.backward(objective_loss(engine(tokens), tokens, None))
        after = _live_tensor_bytes()
        out[f"{stage}-{accum}"] = sum(v for k, v in after.items() if k not in before)
        del engine, model
    return out


@pytest.mark.slow
def test_model_states_match_a_real_deepspeed_engine(tmp_path):
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    shape = Shape.of(ModelConfig(**MEASURED_MODEL))
    for stage, accum in MEASURED_CASES:
        knobs = Knobs(grad_accum_bytes=FP32 if accum == "fp32" else BF16, reduce_bucket=MEASURED_BUCKET)
        mem = memory(shape, Layout(stage), 1, 1, knobs)
        # After backward: no layer is gathered (ZeRO-3 working set 0); only ZeRO-3 keeps its bucket.
        expected = mem["params"] + mem["grads"] + mem["optimizer"] + (BF16 * MEASURED_BUCKET if stage == 3 else 0)
        assert measured[f"{stage}-{accum}"] == pytest.approx(expected, rel=0.02), (stage, accum, measured)


def test_activations_match_saved_tensors_on_cpu():
    # CPU's composite RMS norm keeps its input and output in fp32: norm_bytes = 8 per element.
    cfg = ModelConfig(n_layer=3, n_embd=64, n_head=4, n_px=16)
    model = IGPT(cfg).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(torch.randint(0, cfg.n_vocab, (batch, cfg.seq_len)))
    per_token = activation_bytes_per_token(cfg, norm_bytes=8)
    expected = batch * cfg.seq_len * (cfg.n_layer * per_token["block"] + per_token["head"])
    assert sum(saved.values()) == pytest.approx(expected, rel=0.03)


def test_more_gpus_never_need_more_memory_under_zero3():
    shape = Shape.of(ModelConfig(size="igpt-l"))
    peaks = [memory(shape, Layout(3, micro_batch=4), g, 1, Knobs())["peak"] for g in (1, 8, 64, 512)]
    assert peaks == sorted(peaks, reverse=True)


def test_pipeline_bubble_and_checkpointing_cost_time():
    shape = Shape.of(ModelConfig(size="igpt-m"))
    cluster, knobs = ClusterConfig(tokens_per_s=1e5), Knobs()
    base = estimate(shape, Layout(1, micro_batch=4), 8, 128, cluster, knobs)
    ckpt = estimate(shape, Layout(1, checkpointing=True, micro_batch=4), 8, 128, cluster, knobs)
    pipe = estimate(shape, Layout(1, pp=4, micro_batch=4), 8, 128, cluster, knobs)
    assert ckpt.compute_s == pytest.approx(base.compute_s * 4 / 3)
    assert ckpt.mem_gib["activations"] < base.mem_gib["activations"] / 4
    # 4 stages x dp 2: each GPU runs a quarter of the model on 4x the samples, 16 micro-batches fill the pipe.
    assert pipe.compute_s == pytest.approx(base.compute_s * 4 / 4 * (1 + 3 / 16))


def test_plan_picks_a_fitting_layout_for_every_size():
    cfg = load_config(PlanConfig, overrides=["--model.size=igpt-xl", "--model.n_px=64", "--train.global_batch=128"])
    for n_gpus, rows in plan(cfg, Knobs()).items():
        assert rows[0].fits, n_gpus  # iGPT-XL fits everywhere from 1 GPU (offload) to 1024 (pipeline)
        assert all(rows[0].tokens_per_s >= e.tokens_per_s for e in rows if e.fits)


def test_invalid_layouts_and_clusters_are_refused():
    with pytest.raises(ConfigError):
        Layout(2, pp=2)  # DeepSpeed's pipeline engine takes ZeRO 0/1 only
    with pytest.raises(ConfigError):
        Layout(2, offload="param")
    with pytest.raises(ConfigError):
        load_config(PlanConfig, overrides=["--cluster.gpus=[]"])


def test_cli_writes_json(tmp_path):
    policy, out = tmp_path / "zero3.json", tmp_path / "plan.json"
    policy.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    cli = [sys.executable, str(REPO / "launcher" / "plan.py"), "--model.size=igpt-s", "--train.global_batch=64"]
    args = ["--cluster.gpus=[1,16]", f"--train.ds_config={policy}", "--json", str(out)]
    run = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fastest that fits" in run.stdout
    report = json.loads(out.read_text())
    assert set(report["plans"]) == {"1", "16"}
    assert report["plans"]["1"]["configured"]["layout"] == "zero3"
    bad = subprocess.run([*cli, "--model.size=igpt-q"], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "igpt-plan: error:" in bad.stderr
    views = subprocess.run([*cli, *args, "--views=8", "--train_images=1000"], capture_output=True, text=True,
                           timeout=300, check=False)  # fmt: skip
    assert "## Shards: 1,000 training images at 32x32" in views.stdout and "(8 views: 0.02 GB)" in views.stdout
    assert json.loads(out.read_text())["shards"]["bytes"] == 1000 * (2 * 1024 + 8) + 8 * 1000 * 2 * 1024


def test_shard_bytes_and_build_rates_are_the_measured_ones():
    """A view of ImageNet train is 2.62 GB at 32x32 and 10.5 GB at 64x64 (2 bytes a token); the planner's build rates
    are the ones bench/shard_throughput.py committed."""
    assert ShardCost(1_281_167, 32, 0).view_bytes == 2_623_830_016
    assert ShardCost(1_281_167, 64, 0).view_bytes == 10_495_320_064
    cost = ShardCost(1_281_167, 32, 4)
    assert cost.total_bytes == 1_281_167 * 8 + 5 * 2_623_830_016
    measured = json.loads((REPO / "bench" / "results" / "shards.json").read_text())
    assert shards_plan.IMAGES_PER_CORE_S == measured["runs"]["jpeg_workers1"]["images_per_cpu_s"]
    assert shards_plan.VIEW_CORE_MS == measured["view_cpu_ms_per_image"] > 0
    assert cost.hours(1) == pytest.approx(1_281_167 * (1 / shards_plan.IMAGES_PER_CORE_S
                                                       + 4 * shards_plan.VIEW_CORE_MS / 1000) / 3600)  # fmt: skip


if __name__ == "__main__":  # the child process of test_model_states_match_a_real_deepspeed_engine
    print(json.dumps(_measure(sys.argv[1])))
