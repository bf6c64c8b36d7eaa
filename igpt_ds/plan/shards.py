"""What the pixel shards of a training set cost: bytes on disk and build time, for the evaluation crop and for each
augmented view (`igpt-build-shards --views K`, docs/reference.md#augmentation).

Bytes are exact: a token is 2 bytes (uint16), an image n_px² tokens, a label 8 bytes; a view adds its tokens and
nothing else. Build time is decoding + cropping + quantising at the per-core rates measured by
`bench/shard_throughput.py` on real-photo JPEGs of ImageNet's sizes at 32x32 (`bench/results/shards.md`): a view
re-decodes the JPEG at the scale its smallest crop needs and resamples K crops, so it costs a share of a decode.
Reading the source from storage is not modelled (at ImageNet's ~140 GB of JPEGs it sets the time on a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGES_PER_CORE_S = 1416.7
"""Images an evaluation crop per CPU-second (JPEG, draft decoding, 32x32; bench/results/shards.md)."""
VIEW_CORE_MS = 0.36
"""CPU-milliseconds a view adds per image (JPEG, --views 4, 32x32; bench/results/shards.md)."""


@dataclass(frozen=True)
class ShardCost:
    images: int
    n_px: int
    views: int

    @property
    def crop_bytes(self) -> int:
        """The evaluation crops' tokens and the labels."""
        return self.images * (2 * self.n_px**2 + 8)

    @property
    def view_bytes(self) -> int:
        """One view of every image."""
        return self.images * 2 * self.n_px**2

    @property
    def total_bytes(self) -> int:
        return self.crop_bytes + self.views * self.view_bytes

    @property
    def crop_core_hours(self) -> float:
        return self.images / IMAGES_PER_CORE_S / 3600

    @property
    def view_core_hours(self) -> float:
        """Core-hours one view of every image adds."""
        return self.images * VIEW_CORE_MS / 1000 / 3600

    def hours(self, cores: int) -> float:
        """Wall hours on `cores` cores (linear in cores: each image is independent work)."""
        return (self.crop_core_hours + self.views * self.view_core_hours) / cores


def describe(cost: ShardCost, cores_per_node: int, nodes: tuple[int, ...] = (1, 16, 64)) -> str:
    """The planner's lines on the shards: bytes per copy and per view, core-hours, wall time at `nodes` nodes."""
    gb = lambda n: f"{n / 1e9:,.2f} GB"
    with_views = f" ({cost.views} views: {gb(cost.views * cost.view_bytes)})" if cost.views else ""
    wall = lambda h: f"{h * 3600:,.0f} s" if h < 1 / 60 else f"{h * 60:,.1f} min"
    minutes = " / ".join(wall(cost.hours(n * cores_per_node)) for n in nodes)
    return "\n".join([
        f"## Shards: {cost.images:,} training images at {cost.n_px}x{cost.n_px}",
        f"on disk: evaluation crop {gb(cost.crop_bytes)}; each view {gb(cost.view_bytes)}{with_views}; "
        f"total {gb(cost.total_bytes)}",
        f"build: {cost.crop_core_hours:,.2f} core-hours for the crop + {cost.view_core_hours:,.2f} per view "
        f"({IMAGES_PER_CORE_S:,.0f} images per core-second, {VIEW_CORE_MS:.2f} core-ms a view, measured on JPEGs "
        f"at 32x32); at {' / '.join(str(n) for n in nodes)} nodes of {cores_per_node} cores: {minutes} "
        "(reading the source not included)",
    ])  # fmt: skip
