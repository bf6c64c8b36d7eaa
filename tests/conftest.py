"""Shared test setup: CPU DeepSpeed, a cached op-build folder, deterministic seeds."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Set before anything imports deepspeed: tests run on CPU (gloo) and reuse JIT-built ops.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
