"""Training metrics: TensorBoard (rank 0), a console line every `train.log_every` steps, a tqdm bar
when stdout is a terminal.

Scalars: train/loss (nats/pixel), train/bits_per_pixel, train/lr, train/grad_norm,
perf/tokens_per_s, perf/samples_per_s, perf/step_time_s, perf/data_wait_frac (the share of the time the
loop waited for batches), perf/tflops_per_device and perf/mfu (GPU only: model FLOPs per token and
device peak from `igpt_ds.models.flops`), memory/max_allocated_gib (GPU) or memory/max_rss_gib (CPU),
val/loss, val/bits_per_pixel; the resolved config as text, and hparams with the final losses at the
end of a run. DeepSpeed's own monitor logs the training loss only under the pipeline engine
(docs/reference.md#deepspeed); these are logged the same way for both layouts.

`tensorboard --logdir runs/` shows them.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import torch

from igpt_ds.config import ModelConfig, flatten
from igpt_ds.models.flops import peak_flops, train_flops_per_token


def memory_gib() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


class Metrics:
    """Rank 0 writes; on other ranks every method is a no-op, so callers need no rank checks."""

    def __init__(
        self,
        writer: Any,
        *,
        model_cfg: ModelConfig,
        world_size: int,
        global_batch: int,
        max_steps: int,
        start_step: int,
    ):
        """`writer`: rank 0's SummaryWriter (`run_folder.open_tensorboard`), None on the other ranks."""
        self.enabled, self.writer = writer is not None, writer
        self.world_size, self.global_batch, self.max_steps = world_size, global_batch, max_steps
        self.seq_len = model_cfg.seq_len
        self.flops_per_token, self.peak = train_flops_per_token(model_cfg), peak_flops()
        self.last: dict[str, float] = {}
        self.bar = None
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self) -> None:
        """Advance the progress bar (host only, no device sync)."""
        if self.bar is not None:
            self.bar.update(1)

    def train(
        self, step: int, loss: float, lr: float, grad_norm: float | None, steps: int, seconds: float, data_wait_s: float
    ) -> None:
        """Log the mean training loss and the throughput of the last `steps` steps, which took `seconds`, of
        which the loop spent `data_wait_s` waiting for their batches."""
        if not self.enabled:
            return
        samples_per_s = steps * self.global_batch / seconds
        tokens_per_s = samples_per_s * self.seq_len
        values = {
            "train/loss": loss,
            "train/bits_per_pixel": loss / math.log(2),
            "train/lr": lr,
            "perf/tokens_per_s": tokens_per_s,
            "perf/samples_per_s": samples_per_s,
            "perf/step_time_s": seconds / steps,
            "perf/data_wait_frac": data_wait_s / seconds,
            **memory_gib(),
        }
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        if self.peak is not None:
            tflops = tokens_per_s * self.flops_per_token / self.world_size
            values.update({"perf/tflops_per_device": tflops / 1e12, "perf/mfu": tflops / self.peak})
        self._write(step, values)
        grad = f" grad {grad_norm:.3f}" if grad_norm is not None else ""
        mfu = f" MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else ""
        self.print(
            f"step {step}/{self.max_steps} loss {loss:.4f} ({loss / math.log(2):.3f} bits/px) lr {lr:.2e}{grad}"
            f" | {tokens_per_s / 1e3:.1f}k tok/s {samples_per_s:.1f} samples/s {seconds / steps:.3f} s/step{mfu}"
            f" data wait {data_wait_s / seconds:.1%}"
        )

    def val(self, step: int, loss: float) -> None:
        if self.enabled:
            self._write(step, {"val/loss": loss, "val/bits_per_pixel": loss / math.log(2)})
            self.print(f"step {step}/{self.max_steps} val loss {loss:.4f} ({loss / math.log(2):.3f} bits/px)")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self, hparams: dict[str, Any]) -> None:
        """Record the run's hyperparameters with its final losses, and flush."""
        if not self.enabled:
            return
        final = {f"hparam/{k.replace('/', '_')}": v for k, v in self.last.items() if k in ("train/loss", "val/loss")}
        scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(hparams).items()}
        self.writer.add_hparams(scalars, final, run_name=".")  # TensorBoard takes scalars and strings only
        self.writer.close()
        if self.bar is not None:
            self.bar.close()

    def _write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.last.update(values)
