"""What evaluating a model on a dataset costs: feature bytes on disk, memory per rank for extraction and for
the data-parallel probe, probe compute per L-BFGS pass; for any model size, dataset and rank count.

Formulas (N = images of a split, d = n_embd, L = extracted layers, T = n_px², B = extraction batch,
K = classes, D = probe width: d for a layer, k·d for the k-layer concatenation, T·channels for pixels):

- disk, per split:        N·L·d·4 B of features (N·d·4 a layer) + N·T·channels B of pixels
- extraction, device:     fp32 weights (4·params) + one batch of activations, ~B·T·d·ACT_WIDTHS values of the
                          compute dtype (no gradients: residual, norm, q/k/v, attention output, 4d MLP hidden
                          twice; flash/SDPA attention keeps no T×T matrix) + one batch of features (B·L·d·4)
- extraction, host:       the largest weight tensor (weights are read tensor by tensor) + the split's labels
                          (8·N) + one batch of tokens, features and pixels
- probe, per rank:        its rows of every split, fp32: ~(N_train + N_val + N_test)/world·D·4, in whole
                          `logreg.BLOCK_ROWS` blocks + the solver state replicated on every rank,
                          `logreg.SOLVER_COPIES`·(D·K + K) float32 values + one run of blocks'
                          temporaries + every split's labels (8·N, read whole)
- probe compute:          4·N_train·D·K FLOPs per L-BFGS pass (logits and gradient), divided over ranks

Checked against measurement: bench/probe_scale.py prints measured peak RSS per rank beside `probe_bytes`.

    python launcher/plan_eval.py                                   # iGPT-S/M/L/XL on CIFAR-10 and ImageNet
    python launcher/plan_eval.py --sizes '[igpt-l]' --datasets '[imagenet]' --ranks '[8, 64]'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from igpt_ds.config import MODEL_SIZES, ConfigError, ModelConfig
from igpt_ds.data.sampler import rank_rows
from igpt_ds.eval import logreg
from igpt_ds.models.igpt import count_parameters

GB = 1e9
ACT_WIDTHS = 12
"""Live activation values per token, in units of n_embd, in a no-grad forward pass (see the module docstring)."""


@dataclass(frozen=True)
class Dataset:
    n_train: int
    n_val: int
    n_test: int
    n_classes: int
    channels: int = 3

    @property
    def n(self) -> int:
        return self.n_train + self.n_val + self.n_test


DATASETS = {
    # 10% of the 50k train images held out for validation (the paper's CIFAR protocol); the 10k test images.
    "cifar10": Dataset(45_000, 5_000, 10_000, 10),
    # 4% of ILSVRC-2012's 1,281,167 train images held out for validation; the 50k ILSVRC val images as test.
    "imagenet": Dataset(1_229_920, 51_247, 50_000, 1000),
}
PAPER_N_PX = {"igpt-s": 32, "igpt-m": 32, "igpt-l": 32, "igpt-xl": 64}


def feature_disk_bytes(n: int, dim: int, n_layers: int, seq_len: int, channels: int) -> int:
    """Bytes of one extracted split's features and pixels (headers aside)."""
    return n * (n_layers * dim * 4 + seq_len * channels)


def probe_rows(n: int, world: int) -> int:
    """Rows the busiest rank holds of a split of n rows (`sampler.rank_rows` in the solver's blocks). O(world)."""
    return max(len(rank_rows(n, r, world, logreg.BLOCK_ROWS)) for r in range(world))


def probe_bytes(n_train: int, n_val: int, n_test: int, dim: int, n_classes: int, world: int, gpu: bool) -> int:
    """Peak memory of one rank fitting one probe (see the module docstring), bytes."""
    value = 4  # float32 solver state on either device (logreg.solver_dtype); `gpu` only names where it runs
    rows = sum(probe_rows(n, world) for n in (n_train, n_val, n_test)) * dim * 4
    solver = logreg.SOLVER_COPIES * (dim * n_classes + n_classes) * value
    run = max(1, min(logreg.MAX_RUN_BLOCKS, logreg.RUN_VALUES // (dim * n_classes)))  # blocks computed at once
    block = run * (logreg.BLOCK_ROWS * (dim + 3 * n_classes) * 4 + dim * n_classes * 20)
    return rows + solver + block + 8 * (n_train + n_val + n_test)


@dataclass
class EvalPlanConfig:
    """What evaluating models on datasets costs (launcher/plan_eval.py)."""

    sizes: list[str] = field(default_factory=lambda: ["igpt-s", "igpt-m", "igpt-l", "igpt-xl"])
    """Model sizes (config.MODEL_SIZES)."""
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    """cifar10, imagenet."""
    n_px: int = 0
    """Image side; 0 = the paper's (32 for S/M/L, 64 for XL)."""
    ranks: list[int] = field(default_factory=lambda: [1, 8, 64, 1024])
    batch_size: int = 64
    """Extraction batch per rank."""
    concat_k: int = 5
    """Layers in the concatenation probe (paper's iGPT-XL: 5)."""
    gpu: bool = True
    """Probe on GPUs rather than CPUs (the report's wording; the solver state is float32 on both)."""
    compute_bytes: int = 2
    """Bytes per activation value in extraction (2: bf16 on GPU; 4: fp32 on CPU)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in MODEL_SIZES] + [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ConfigError(
                f"unknown sizes/datasets {unknown}; sizes: {list(MODEL_SIZES)}, datasets: {list(DATASETS)}"
            )
        if not self.ranks or min(self.ranks) < 1 or self.batch_size < 1 or self.concat_k < 1:
            raise ConfigError("ranks must be >= 1, batch_size >= 1, concat_k >= 1")


def eval_costs(size: str, dataset: str, cfg: EvalPlanConfig) -> list[dict]:
    """One row per rank count: bytes on disk, per-rank memory of extraction and of each probe, FLOPs a pass."""
    n_px = cfg.n_px or PAPER_N_PX.get(size, 32)
    model = ModelConfig(size=size, n_px=n_px)
    data = DATASETS[dataset]
    d, L, T, B = model.n_embd, model.n_layer + 1, model.seq_len, cfg.batch_size
    params = count_parameters(model)
    largest_tensor = max(4 * d * d, model.n_vocab * d, T * d)  # MLP c_fc, lm_head/wte, wpe
    disk_layer = data.n * d * 4
    disk = feature_disk_bytes(data.n, d, L, T, data.channels)
    rows = []
    for world in cfg.ranks:
        probe = lambda dim, w=world: probe_bytes(data.n_train, data.n_val, data.n_test, dim, data.n_classes, w, cfg.gpu)
        rows.append({
            "ranks": world,
            "disk_per_layer_gb": disk_layer / GB,
            "disk_all_layers_gb": disk / GB,
            "extract_device_gb": (4 * params + B * T * d * ACT_WIDTHS * cfg.compute_bytes + B * L * d * 4) / GB,
            "extract_host_gb": (4 * largest_tensor + 8 * data.n_train + B * (T * 8 + L * d * 4 + T * 3)) / GB,
            "images_per_rank": math.ceil(data.n / world),
            "probe_layer_gb": probe(d) / GB,
            "probe_concat_gb": probe(cfg.concat_k * d) / GB,
            "probe_pixels_gb": probe(T * data.channels) / GB,
            "pass_tflop_per_rank": 4 * probe_rows(data.n_train, world) * d * data.n_classes / 1e12,
        })  # fmt: skip
    return rows


COLUMNS = [
    ("ranks", "ranks", "{:,}"),
    ("disk_per_layer_gb", "disk/layer GB", "{:.2f}"),
    ("disk_all_layers_gb", "disk all GB", "{:.1f}"),
    ("extract_device_gb", "extract dev GB", "{:.1f}"),
    ("extract_host_gb", "extract host GB", "{:.2f}"),
    ("probe_layer_gb", "probe layer GB", "{:.2f}"),
    ("probe_concat_gb", "probe concat GB", "{:.2f}"),
    ("probe_pixels_gb", "probe pixels GB", "{:.2f}"),
    ("pass_tflop_per_rank", "TFLOP/pass/rank", "{:.3f}"),
]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `eval_costs` rows."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def report(cfg: EvalPlanConfig) -> None:
    """Print the cost tables for every size x dataset of `cfg` (launcher/plan_eval.py, igpt-plan-eval)."""
    for size in cfg.sizes:
        for dataset in cfg.datasets:
            data, n_px = DATASETS[dataset], cfg.n_px or PAPER_N_PX.get(size, 32)
            where = "GPU" if cfg.gpu else "CPU"
            print(f"\n## {size} at {n_px}x{n_px} on {dataset}: {data.n_train:,} train / {data.n_val:,} val / "
                  f"{data.n_test:,} test images, {data.n_classes} classes; probe solver on {where}")  # fmt: skip
            print(format_table(eval_costs(size, dataset, cfg)))
