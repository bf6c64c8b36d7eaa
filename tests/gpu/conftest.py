"""GPU checks: DeepSpeed picks the CUDA accelerator here (the suite's root conftest sets the CPU one otherwise)."""

import os

import torch

if torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cuda"
