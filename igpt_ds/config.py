"""One typed configuration per run: dataclasses, model-size registry, YAML presets, CLI overrides.

Precedence, stated once: dataclass defaults < YAML preset (`--config file.yaml`) < dotted CLI
overrides (`--train.lr=3e-4` or `--train.lr 3e-4`). Unknown keys and values of the wrong type are
errors (`ConfigError`), raised before anything runs. Derived values (sequence length, gradient
accumulation) are properties, never knobs.

`model.size` names a preset from `MODEL_SIZES` (docs/reference.md#model); explicit `model.n_layer` etc.
override the preset's values.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jsonargparse
import yaml


class ConfigError(ValueError):
    """A configuration or input the user must fix; entry points print it as one line, exit 2."""


class RunError(RuntimeError):
    """A run that cannot go on (training diverged, a disk filled up, a rank stopped answering): entry points print it
    as one line saying what happened and what to do, and exit 3. Nothing good was overwritten."""


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
    """model: the GPT-2-style iGPT Transformer (docs/reference.md#model)."""

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
    """BERT objective: probability that a position is masked (paper: 0.15)."""
    bert_mask: str = "bernoulli"
    """BERT objective: 'bernoulli' masks each position independently (paper, OpenAI's code); 'exact' masks exactly
    max(1, round(mask_prob·T)) positions per image (lower-variance steps; not the paper's)."""

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
        _require(
            self.bert_mask in ("bernoulli", "exact"), f"model.bert_mask={self.bert_mask!r} must be bernoulli or exact"
        )

    @property
    def seq_len(self) -> int:
        return self.n_px**2


@dataclass
class DataConfig:
    """data: the pixel shards to train on (built by igpt-build-shards)."""

    shards: str = "demo_out/shards"
    """Folder holding manifest.json written by `igpt-build-shards`."""
    train_split: str = "train"
    val_split: str = "val"
    verify_checksums: bool = False
    """Hash every shard against the manifest before training (slow on big datasets)."""
    views: bool = True
    """Train on the augmented views the shards hold (`igpt-build-shards --views K`): one of the K views of each image
    per epoch, chosen by (train.seed, epoch, image); false, or shards without views: the evaluation crop every
    epoch. Evaluation, the live probe and feature extraction always read the evaluation crop."""
    flip: bool = False
    """Mirror each training sample left to right with probability 1/2, by (train.seed, epoch, image): exact on
    tokens (a token is a pixel). Off by default: the paper names flips for CIFAR fine-tuning, not pretraining."""


@dataclass
class OptimConfig:
    """optim: AdamW and the learning-rate schedule: Adam β=(0.9, 0.95), warmup then cosine
    (docs/reference.md#objectives-and-recipe)."""

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
    """train: run length, batch sizes, engine policy (DeepSpeed JSON), layout, logging and checkpoints."""

    name: str = "igpt"
    """Run name: outputs go to <run_root>/<name>/."""
    run_root: str = "runs"
    ds_config: str = ""
    """DeepSpeed JSON (a path or a shipped name: zero3_bf16, cpu, ...; also --deepspeed_config). Empty: bf16
    with the layout's ZeRO stage on a GPU (zero3_bf16 / pipeline_zero1_bf16), fp32 ZeRO-1 on a CPU (cpu).
    Keys the run config owns (batch sizes, accumulation, clipping, optimizer) may appear if they agree or
    are "auto"."""
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
    probe_every: int = 1000
    """Live linear probe every this many steps (0 = never; off by itself when the shards have no
    labels): pooled features of `probe_layers` on a fixed labelled subset, a probe per layer fitted by all ranks,
    validation accuracy per layer in TensorBoard (igpt_ds.train.live_probe)."""
    probe_at_start: bool = False
    """Also probe at step 0 (the curve from initialisation; one more probe per run, which in a short run of short
    steps is most of the probe's cost)."""
    probe_images: int = 2048
    """Train-split images the live probe fits on (evenly spaced over the split; the same every time)."""
    probe_val_images: int = 1024
    """Validation-split images the live probe scores on."""
    probe_layers: list[int] = field(default_factory=list)
    """Layers the live probe reads (l < n_layer: block l's normalised input; n_layer: final norm); empty = all."""
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    init_from: str = ""
    """Consolidated safetensors checkpoint to initialise weights from (ignored when resuming)."""
    reset_data_position: bool = False
    """When resuming: continue from the checkpoint's weights, optimizer and step but start the data order
    afresh, for shards rebuilt since (more images) or a new train.seed; without it such a resume is refused."""
    resume_fallback: bool = False
    """When the checkpoint `latest` names is damaged (a truncated or missing file): resume from the newest intact
    one before it, moving the damaged one aside as damaged_<tag>; without it such a resume is refused in one line."""
    dist_timeout_s: int = 600
    """Collective timeout, on every process group (DeepSpeed's too): a dead or stalled rank makes the others fail
    after this long, naming it, instead of hanging."""

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
        _require(
            self.probe_every >= 0 and min(self.probe_images, self.probe_val_images) > 0,
            "train.probe_every must be >= 0, probe_images and probe_val_images > 0",
        )

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
    """Pretraining: one configuration per run (launcher/pretrain.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


T = TypeVar("T")

# Field docstrings become --help text (jsonargparse reads the strings under each dataclass field).
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
"""YAML presets shipped with the package (`launcher/configs` in a checkout links here)."""
DS_CONFIGS_DIR = Path(__file__).resolve().parent / "ds_configs"
"""DeepSpeed JSONs shipped with the package (`ds_configs` in a checkout links here)."""


def find_shipped(value: str | Path, folder: Path, checkout_dir: str, flag: str) -> Path:
    """A file named on the command line: the path if it exists, else the file of that name shipped in `folder`
    when `value` is a bare name (`zero3_bf16`, `zero3_bf16.json`) or the checkout path the docs use
    (`ds_configs/zero3_bf16.json`), so documented commands work from any directory after `pip install`.

    Raises ConfigError naming `flag`, the value and the shipped names when neither exists.
    """
    path = Path(value)
    if path.is_file():
        return path
    suffix = next(iter({p.suffix for p in folder.iterdir()}), "")
    shipped = folder / (path.name if path.suffix else path.name + suffix)
    if shipped.is_file() and str(path.parent) in (".", checkout_dir):
        return shipped
    names = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    raise ConfigError(f"{flag}={value} does not exist; give a path or the name of a shipped one {names}")


def find_preset(value: str | Path) -> Path:
    """`--config` value → YAML preset file (a path or a shipped preset's name, e.g. `igpt_s_imagenet32`)."""
    return find_shipped(value, PRESETS_DIR, "launcher/configs", "--config")


def _read_preset(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded


def declared_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """The defaults written in the dataclass declarations, by dotted key.

    Not an instance's values: `__post_init__` resolves `model.n_layer=0` from `model.size`, and a help
    text or parser that took the resolved 2 as the default would pin igpt-tiny's depth on `--model.size=igpt-s`.
    A section whose factory is not its bare class (fine-tuning's `optim` and `train`) declares its own defaults:
    its fields that the factory set to other values than the class declares count too, or a run without a preset
    would silently take pretraining's learning rate and schedule.
    """
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            inner = declared_defaults(section, f"{prefix}{f.name}.")
            factory = f.default_factory
            if factory is not dataclasses.MISSING and factory is not section:
                built = factory()
                for g in dataclasses.fields(section):
                    key = f"{prefix}{f.name}.{g.name}"
                    if key in inner and getattr(built, g.name) != inner[key]:
                        inner[key] = getattr(built, g.name)
            out.update(inner)
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
    return out


def make_parser(cls: type, description: str = "", prog: str | None = None) -> jsonargparse.ArgumentParser:
    """The command line of a run configured by dataclass `cls`: `--config` + one `--section.field` per field.

    `--help` lists every field with its type, default and docstring. Built by jsonargparse, which checks
    keys and types of the YAML and the flags alike.
    """
    parser = jsonargparse.ArgumentParser(
        prog=prog,
        description=description,
        exit_on_error=False,
        allow_abbrev=False,  # `--train.max_step` must not quietly mean --train.max_steps
        default_env=False,
        epilog="Precedence: field defaults < --config YAML < --section.key=value flags, whatever their order.",
    )
    presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    parser.add_argument(
        "--config",
        action=jsonargparse.ActionConfigFile,
        help=f"YAML preset: a path, or a shipped preset by name ({presets})",
    )
    parser.add_class_arguments(cls, nested_key=None, sub_configs=False)
    parser.set_defaults(declared_defaults(cls))
    return parser


def parse_args(parser: jsonargparse.ArgumentParser, argv: list[str]) -> jsonargparse.Namespace:
    """Parse with the fixed precedence: the `--config` preset first, then every flag (in any order).

    Raises ConfigError (one line) for a missing/malformed preset, an unknown key or a wrong type.
    """
    presets, rest = split_presets(argv)
    front: list[str] = []
    for name in presets:
        path = find_preset(name)
        _read_preset(path)  # the clear errors for a file that is not a mapping of sections
        front += ["--config", str(path)]
        _parse(parser, ["--config", str(path)], where=f"config file {path}: ")  # its errors name the file
    return _parse(parser, front + rest, where="")


def split_presets(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--config` values in order, every other argument)."""
    presets: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a value (a preset path or name)")
            presets.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            presets.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return presets, rest


def _parse(parser: jsonargparse.ArgumentParser, argv: list[str], where: str) -> jsonargparse.Namespace:
    try:
        return parser.parse_args(argv)
    except jsonargparse.ArgumentError as e:
        message = " ".join(str(e).split())
        hint = " (--help lists every flag)" if message.startswith("unrecognized") else ""
        raise ConfigError(f"{where}{message}{hint}") from None


def instantiate(parser: jsonargparse.ArgumentParser, ns: jsonargparse.Namespace, cls: type[T]) -> T:
    """The dataclass `cls` from a parsed namespace (its `__post_init__` checks run here)."""
    ns = ns.clone()
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in [k for k in vars(ns) if k not in fields]:
        delattr(ns, key)  # --config and an entry point's own flags are not fields
    built = parser.instantiate(ns)
    return cls(**{f.name: getattr(built, f.name) for f in dataclasses.fields(cls)})


def load_config(cls: type[T], preset: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from defaults, then the YAML `preset` (path or shipped name), then `--section.key=value` flags."""
    parser = make_parser(cls)
    argv = (["--config", str(preset)] if preset else []) + list(overrides)
    return record_origins(instantiate(parser, parse_args(parser, argv), cls), argv)


def record_origins(cfg: T, argv: list[str]) -> T:
    """Note on `cfg` (and each section) where every field's value came from, for errors that must say so:
    "flag --train.global_batch", "preset <path>" or "default". Read back with `origin_of`."""
    presets, rest = split_presets(list(argv))
    trees = [(p, _read_preset(p)) for p in map(find_preset, presets)]
    flags = {a[2:].split("=", 1)[0] for a in rest if a.startswith("--")}

    def where(key: str) -> str:
        if key in flags:
            return f"flag --{key}"
        for path, tree in reversed(trees):
            node: Any = tree
            for part in key.split("."):
                node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
            if node is not _ABSENT:
                return f"preset {path}"
        return "default"

    def walk(obj: Any, prefix: str) -> None:
        origins = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            origins[f.name] = where(prefix + f.name)
        object.__setattr__(obj, "_origins", origins)

    walk(cfg, "")
    return cfg


_ABSENT = object()


def origin_of(section: Any, name: str) -> str:
    """Where field `name` of config section `section` came from ("flag --train.micro_batch", "preset
    <path>", "default"); "run config" for a section built in code."""
    return getattr(section, "_origins", {}).get(name, "run config")


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Instantiate dataclass `cls` from a nested dict (a saved config.yaml section), checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    parser = make_parser(cls)
    try:
        ns = parser.parse_object(values)
    except jsonargparse.ArgumentError as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {' '.join(str(e).split())}") from None
    return instantiate(parser, ns, cls)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (saved beside every run and checkpoint)."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# The DeepSpeed JSON, read: the engine policy a run names (train.ds_config) or gets (igpt_ds.train.engine).


def load_policy(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON as a dict; ConfigError naming the file when missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.ds_config={path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config={path} is not valid JSON: {e}") from None


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed JSON sets (0 when it sets none)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloaded(ds_config: dict[str, Any]) -> set[str]:
    """What a DeepSpeed JSON's ZeRO section offloads to the host: a subset of {'optimizer', 'param'}."""
    zero = ds_config.get("zero_optimization", {})
    return {k for k in ("optimizer", "param") if zero.get(f"offload_{k}", {}).get("device", "none") != "none"}


def precision(ds_config: dict[str, Any]) -> str:
    """The training precision a DeepSpeed JSON sets: 'bf16', 'fp16' or 'fp32'."""
    return next((p for p in ("bf16", "fp16") if ds_config.get(p, {}).get("enabled")), "fp32")
