"""Which rows each rank reads: the deterministic, resumable sampler of training steps, and the one row split.

numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class GlobalBatchSampler:
    """This data-parallel rank's sample indices for each global step; resumable, world-size free.

    The stream is the concatenation over epochs e = 0, 1, ... of a permutation of range(n) seeded
    by (seed, e) (identity without shuffle). Global step s takes stream positions
    [s·global_batch, (s+1)·global_batch); rank r gets the r-th contiguous block of global_batch /
    dp_size of them. The state is the number of samples consumed, so a run saved on 2 ranks
    resumes on 1 (or 8) at exactly the same data.
    """

    def __init__(self, n_samples: int, global_batch: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        if n_samples < 1 or global_batch < 1:
            raise ValueError(f"need n_samples >= 1 and global_batch >= 1, got {n_samples}, {global_batch}")
        if global_batch % dp_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        self.n_samples, self.global_batch, self.seed, self.shuffle = n_samples, global_batch, seed, shuffle
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank
        self.consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_samples

    def next_indices(self) -> np.ndarray:
        """This rank's indices (per_rank,) int64 for the next global step."""
        out = self.indices_at(self.consumed)
        self.consumed += self.global_batch
        return out

    def indices_at(self, consumed: int) -> np.ndarray:
        """This rank's indices for the global step that starts after `consumed` samples; no state changes,
        so a step can be read ahead of the one training."""
        start = consumed + self.dp_rank * self.per_rank
        positions = np.arange(start, start + self.per_rank)
        epochs = positions // self.n_samples
        out = np.empty(self.per_rank, dtype=np.int64)
        for e in np.unique(epochs):  # a step spans at most a few epochs
            hit = epochs == e
            out[hit] = self._permutation(int(e))[positions[hit] % self.n_samples]
        return out

    def epochs_at(self, consumed: int) -> np.ndarray:
        """The epoch (per_rank,) int64 of each of `indices_at(consumed)`: what keys a sample's view and flip
        (`igpt_ds.data.views`), so an image seen again in a later epoch is seen another way."""
        start = consumed + self.dp_rank * self.per_rank
        return np.arange(start, start + self.per_rank) // self.n_samples

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "n_samples": self.n_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "n_samples", "shuffle") if k in state and state[k] != mine[k]]
        if changed:
            raise ValueError(f"sampler state was saved with other {', '.join(changed)}: {state} vs {mine}")
        self.consumed = int(state["consumed"])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step needs at most the current and next epoch
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n_samples) if self.shuffle else np.arange(self.n_samples)
        return self._perms[epoch]


def rank_rows(n: int, rank: int, world: int, block: int = 1) -> range:
    """Rank's contiguous, order-preserving share of range(n) in whole blocks of `block` rows (the last block may be
    short): the shares are disjoint and cover range(n). `block` 1 splits rows evenly; the probe's solver uses
    256-row blocks, its unit of exact summation (`igpt_ds.eval.logreg.BLOCK_ROWS`)."""
    blocks = math.ceil(n / block)
    return range(min(n, blocks * rank // world * block), min(n, blocks * (rank + 1) // world * block))


def padded_batches(n: int, rank: int, world: int, batch: int, block: int = 1) -> list[np.ndarray]:
    """This rank's rows of range(n) (`rank_rows`) in batches of at most `batch`, as many batches on every rank: a
    rank with fewer rows gets empty ones at the end. For collective forward passes (ZeRO-3 gathers parameters in
    each; a pipeline stage sends to the next), which every rank must make the same number of times. O(world)."""
    mine = rank_rows(n, rank, world, block)
    count = max(math.ceil(len(rank_rows(n, r, world, block)) / batch) for r in range(world))
    rows = np.arange(mine.start, mine.stop)
    return [rows[i * batch : (i + 1) * batch] for i in range(count)]
