"""One typed configuration per run: dataclasses, model-size registry, YAML presets, CLI overrides.

Precedence, stated once: dataclass defaults < YAML preset (`--config file.yaml`) < dotted CLI
overrides (`--train.lr=3e-4` or `--train.lr 3e-4`). Unknown keys and values of the wrong type are
errors (`ConfigError`), raised before anything runs. Derived values (sequence length, gradient
accumulation) are properties, never knobs.

`model.size` names a preset from `MODEL_SIZES` (REFERENCE.md table); explicit `model.n_layer` etc.
override the preset's values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration or input the user must fix; entry points print it as one line, exit 2."""


MODEL_SIZES: dict[str, dict[str, int]] = {
    "igpt-tiny": dict(n_layer=2, n_head=2, n_embd=32),
    "igpt-mini": dict(n_layer=4, n_head=4, n_embd=64),
    "igpt-s": dict(n_layer=24, n_head=8, n_embd=512),
    "igpt-m": dict(n_layer=36, n_head=8, n_embd=1024),
    "igpt-l": dict(n_layer=48, n_head=16, n_embd=1536),
    "igpt-xl": dict(n_layer=60, n_head=24, n_embd=3072),
}


@dataclass
class ModelConfig:
    size: str = "igpt-tiny"
    """Named size from MODEL_SIZES; n_layer/n_head/n_embd given explicitly override it."""
    n_layer: int = 0
    """Transformer blocks (0 = take from `size`)."""
    n_head: int = 0
    """Attention heads (0 = take from `size`)."""
    n_embd: int = 0
    """Residual width (0 = take from `size`)."""
    n_px: int = 32
    """Image side in pixels; the sequence is n_px**2 tokens in raster order."""
    n_vocab: int = 512
    """Palette size (k-means colours)."""
    bias: bool = False
    """Linear layers with biases (official iGPT has none; needed to load weights that have them)."""
    objective: str = "ar"
    """'ar' (next pixel, causal) or 'bert' (masked pixels, bidirectional)."""
    mask_prob: float = 0.15
    """BERT objective: fraction of positions masked."""

    def __post_init__(self) -> None:
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"model.size={self.size!r} is unknown; choose one of {list(MODEL_SIZES)}")
        for name, value in MODEL_SIZES[self.size].items():
            if getattr(self, name) == 0:
                setattr(self, name, value)
        _require(self.n_layer > 0 and self.n_head > 0 and self.n_embd > 0, "model sizes must be > 0")
        _require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}",
        )
        _require(self.n_px > 0, f"model.n_px={self.n_px} must be > 0")
        _require(1 < self.n_vocab <= 65536, f"model.n_vocab={self.n_vocab} must be in 2..65536")
        _require(self.objective in ("ar", "bert"), f"model.objective={self.objective!r} must be 'ar' or 'bert'")
        _require(0.0 < self.mask_prob < 1.0, f"model.mask_prob={self.mask_prob} must be in (0, 1)")

    @property
    def seq_len(self) -> int:
        return self.n_px**2


@dataclass
class DataConfig:
    shards: str = "demo_out/shards"
    """Folder holding manifest.json written by `igpt-build-shards`."""
    train_split: str = "train"
    val_split: str = "val"
    verify_checksums: bool = False
    """Hash every shard against the manifest before training (slow on big datasets)."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (paper: ~3e-3 for iGPT-S, 1e-3 for iGPT-L at 32x32)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr`."""
    schedule: str = "cosine"
    """'cosine' (to 0 at train.max_steps) or 'constant' after warmup."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    fused: bool = False
    """torch.optim.AdamW(fused=True): one kernel for all parameters instead of a loop of them. Not with
    ZeRO optimizer offload, where DeepSpeed's CPU Adam steps the states."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(
            self.schedule in ("cosine", "constant"), f"optim.schedule={self.schedule!r} must be 'cosine' or 'constant'"
        )
        _require(all(0 <= b < 1 for b in self.betas), f"optim.betas={self.betas} must lie in [0, 1)")


@dataclass
class TrainConfig:
    name: str = "igpt"
    """Run name: outputs go to <run_root>/<name>/."""
    run_root: str = "runs"
    ds_config: str = "ds_configs/cpu.json"
    """DeepSpeed JSON: engine policy only (ZeRO stage, precision, offload, buckets)."""
    layout: str = "zero"
    """'zero' (ZeRO data parallel, stage from ds_config) or 'pipeline' (pipeline x data parallel)."""
    pipeline_stages: int = 1
    activation_checkpointing: bool = False
    """Recompute transformer blocks in backward (blocks only, never the embedding)."""
    compile: bool = False
    """Compile the model with torch.compile through DeepSpeed's engine.compile() (the pipeline: each layer)."""
    global_batch: int = 16
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch: int = 8
    """Samples per forward/backward on one rank."""
    max_steps: int = 100
    """Length of the run and of the LR schedule."""
    stop_at: int = 0
    """End this process after this step, checkpointing first, schedule unchanged (0 = at max_steps):
    for allocations shorter than the run; rerunning the same command resumes."""
    log_every: int = 10
    stop_check_every: int = 10
    """Steps between the ranks' agreement on a stop request (SIGTERM, SIGINT, SIGUSR1, or the launcher gone):
    a signal stops the run, with a checkpoint, within this many steps. Each check is one one-element
    all-reduce."""
    eval_every: int = 50
    """Validation every this many steps (0 = never)."""
    eval_batches: int = 4
    """Global batches of the validation split per evaluation (the same ones each time)."""
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    init_from: str = ""
    """Consolidated safetensors checkpoint to initialise weights from (ignored when resuming)."""
    reset_data_position: bool = False
    """When resuming: continue from the checkpoint's weights, optimizer and step but start the data order
    afresh, for shards rebuilt since (more images) or a new train.seed; without it such a resume is refused."""
    dist_timeout_s: int = 600
    """Collective timeout: a dead rank makes the others fail after this long instead of hanging."""

    def __post_init__(self) -> None:
        _require(self.layout in ("zero", "pipeline"), f"train.layout={self.layout!r} must be 'zero' or 'pipeline'")
        _require(self.pipeline_stages >= 1, "train.pipeline_stages must be >= 1")
        _require(self.global_batch > 0 and self.micro_batch > 0, "train.global_batch and train.micro_batch must be > 0")
        _require(self.max_steps > 0, "train.max_steps must be > 0")
        _require(0 <= self.stop_at <= self.max_steps, f"train.stop_at={self.stop_at} must be in 0..train.max_steps")
        _require(
            min(self.log_every, self.save_every, self.stop_check_every) > 0,
            "train.log_every, train.save_every and train.stop_check_every must be > 0",
        )
        _require(self.eval_every >= 0 and self.eval_batches > 0, "train.eval_every must be >= 0, eval_batches > 0")
        _require(self.keep_checkpoints > 0, "train.keep_checkpoints must be > 0")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def grad_accum(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each rank: global = micro x accumulation x dp."""
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch="
                f"{self.micro_batch} x data-parallel size {dp_size}; pick sizes that divide"
            )
        return self.global_batch // per_step


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


T = TypeVar("T")


def load_config(cls: type[T], preset: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from defaults, then the YAML `preset`, then `--section.key=value` overrides."""
    tree: dict[str, Any] = {}
    if preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = loaded
    for key, value in parse_overrides(overrides):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[leaf] = value
    return build(cls, tree, where="")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b=1`, `--a.b 1` → [('a.b', 1)]; values are parsed as YAML scalars."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"{arg} needs a value (--section.key=value)")
        pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
        i += 1
    return pairs


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Instantiate dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(where + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(arg, v, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None) and value is None:
                return None
        (arg,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(arg, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (saved beside every run and checkpoint)."""
    return dataclasses.asdict(cfg)
