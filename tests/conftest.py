"""Shared test setup: CPU DeepSpeed, a cached op-build folder, deterministic seeds."""

import os
import signal
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent

# Set before anything imports deepspeed: tests run on CPU (gloo) and reuse JIT-built ops.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def one_rank_group():
    """A one-process gloo group (torch.distributed only), torn down after; signal handlers restored."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    from pretrain_support import drop_deepspeed_groups

    drop_deepspeed_groups()  # a test that built an engine on this group left DeepSpeed holding it
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def palette_file(tmp_path_factory):
    """A random 32-colour palette file with its lookup table cached beside it (built once per session)."""
    from data_helpers import write_palette

    from igpt_ds.data import palette as P

    path = write_palette(tmp_path_factory.mktemp("palette") / "palette.npy", k=32)
    P.palette_lut(P.load_palette(path), path)
    return path
