"""What only a GPU can check: bf16 autocast, the flash SDPA kernel, torch.compile under ZeRO-1, NCCL, and the
KV-cached sampler on CUDA. One command on a GPU machine, under 3 minutes (bench/gpu_matrix.sh runs it first):

    python -m pytest tests/gpu -m gpu -q

Skipped only where no CUDA device is present; the default suite deselects the `gpu` marker, and
tests/test_gpu_dry.py collects this file on CPU in CI so it cannot rot unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():  # before DeepSpeed is imported: the suite's conftest sets the CPU accelerator
    os.environ["DS_ACCELERATOR"] = "cuda"

from igpt_ds.config import ModelConfig
from igpt_ds.models.igpt import IGPT
from igpt_ds.models.kv_cache import KVCache

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# A small but GPU-shaped model: 4 layers, width 256, 16x16 = 256 tokens.
SMALL = ModelConfig(size="igpt-mini", n_layer=4, n_head=4, n_embd=256, n_px=16, n_vocab=512)


def small_model(seed: int = 0) -> IGPT:
    torch.manual_seed(seed)
    model = IGPT(SMALL).cuda()
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # the zero-initialised head would give zero gradients
    return model


def batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (n, SMALL.seq_len), generator=torch.Generator().manual_seed(seed)).cuda()


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["DS_ACCELERATOR"] = "cuda"
    return env


def test_bf16_autocast_step_matches_fp32():
    """Tolerance: loss within 1% and the whole gradient's cosine with fp32's >= 0.99."""
    x = batch()
    grads, losses = [], []
    for dtype in (None, torch.bfloat16):
        model = small_model()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = model.loss(x)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert abs(losses[1] - losses[0]) <= 0.01 * losses[0], losses
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) >= 0.99


def test_flash_sdpa_is_selected():
    """The AR attention call (is_causal, no mask) runs on the flash kernel alone, forward and backward in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = small_model(), batch()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        model.loss(x).backward()  # RuntimeError "No available kernel" if flash could not take this call


@pytest.mark.parametrize("local_rank", ["0", "3"], ids=["local-rank-0", "one-gpu-per-task"])
def test_nccl_initialises_on_one_gpu(local_rank):
    """LOCAL_RANK 3 with one visible GPU is Slurm's --gpus-per-task=1 for the node's fourth task: NCCL runs on the one
    device it sees. (In a world of one DeepSpeed binds no device at start-up; the several-rank case, where it asks
    for cuda:$LOCAL_RANK, is tests/test_distributed.py's, with a fake accelerator.)"""
    code = """
import os, torch, torch.distributed as dist
from igpt_ds.distributed.process_group import init_distributed, shutdown
rank, world = init_distributed(120)
t = torch.ones(3, device="cuda")
dist.all_reduce(t)
print(dist.get_backend(), rank, world, t.tolist())
shutdown()
"""
    env = dict(child_env(), RANK="0", LOCAL_RANK=local_rank, WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29731 + int(local_rank)), CUDA_VISIBLE_DEVICES="0")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "nccl 0 1 [1.0, 1.0, 1.0]"


def test_compile_under_zero1_trains(tmp_path):
    """The pretraining entry point with ZeRO-1 bf16, torch.compile and fused AdamW: 4 finite, falling steps."""
    sys.path.insert(0, str(REPO / "bench"))
    from data_throughput import synthetic_shards

    shards = synthetic_shards(256, 16, tmp_path, k=512)
    cmd = [sys.executable, "launcher/pretrain.py", "--model.size=igpt-mini", "--model.n_px=16",
           f"--data.shards={shards}", "--train.ds_config=zero1_bf16", "--train.compile=true", "--optim.fused=true",
           f"--train.run_root={tmp_path / 'runs'}", "--train.name=gpu", "--train.global_batch=16",
           "--train.micro_batch=16", "--train.max_steps=4", "--train.log_every=1", "--train.eval_every=0",
           "--optim.warmup_steps=1"]  # fmt: skip
    env = dict(child_env(), MASTER_PORT="29732")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    engine = next(line for line in out.stdout.splitlines() if line.startswith("engine:"))
    assert "ZeRO stage 1, bf16" in engine
    losses = [float(line.split(" loss ")[1].split()[0]) for line in out.stdout.splitlines() if " loss " in line]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert json.loads((tmp_path / "runs" / "gpu" / "ds_config.json").read_text())["bf16"]["enabled"] is True


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cached_decoding_equals_recompute(dtype, atol):
    """Teacher-forced over one sequence, the KV-cached step's log-probabilities equal the full forward's:
    1e-4 in fp32, 0.1 nats in bf16 (the cache holds bf16 keys and values)."""
    model, x = small_model().eval(), batch(2)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = model(x).float().log_softmax(-1)
        cache = KVCache(SMALL, 2, torch.device("cuda"), dtype)
        steps = [model.step(x[:, :0], cache)] + [model.step(x[:, t : t + 1], cache) for t in range(SMALL.seq_len - 1)]
    cached = torch.stack(steps, 1).float().log_softmax(-1)
    torch.testing.assert_close(cached, full, rtol=0, atol=atol)
