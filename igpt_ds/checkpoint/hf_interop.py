"""Conversion between HF transformers' ImageGPT and our consolidated checkpoints (+ palette).

Why: OpenAI's released iGPT-S/M/L weights reach most users as HF ImageGPT directories
(`config.json` + `model.safetensors` or `pytorch_model.bin`, and a `preprocessor_config.json` holding
the colour `clusters`).
Both directions work on the files alone; `transformers` is needed only to *run* the HF model.

The two implementations are the same network (docs/reference.md#model):
- HF `ImageGPTLayerNorm` is x / sqrt(mean(x²) + eps) · gain, i.e. our gain-only RMS norm;
  `activation_function` "quick_gelu" is our x·sigmoid(1.702x); attention scales by 1/√head_dim.
- HF `Conv1D` stores weights (in, out) and computes x @ W + b; our nn.Linear stores (out, in), so
  every c_attn / c_proj / c_fc weight is transposed. c_attn is fused q|k|v in both.
- HF `wte` has vocab_size = n_vocab + 1 rows; the last row (id n_vocab) is the SOS token, which we
  keep as the separate `sos` vector. HF `lm_head` has n_vocab rows, no bias, untied — like ours.
- HF `Conv1D` always has biases (zero in OpenAI's converted weights). Importing keeps them, with
  `ModelConfig.bias=True`, only when one is non-zero; exporting a bias-free model writes zeros.

Lining up positions and losses. Our `IGPT(tokens)` takes the T pixels and prepends SOS itself, so
logits[:, i] predict pixel i for every i in 0..T-1. HF takes input_ids with SOS already prepended
by the caller and has only T = n_positions positions, so the same logits come from
`ImageGPTForCausalImageModeling(hf_input_ids(tokens, n_vocab))` (SOS, pixels 0..T-2).
HF's built-in loss (`labels=input_ids`) shifts the labels by one, so it scores pixels 0..T-2 and
skips the last pixel, which no HF position predicts; our loss averages all T pixels.
Per pixel the cross-entropies are identical wherever both are defined (tests/test_hf_interop.py).

Palettes: HF's `clusters` and OpenAI's `kmeans_centers.npy` are the same (k, 3) array in the space
x/127.5 - 1 that `igpt_ds.data.palette` uses, so our tokens agree id for id with an `ImageGPTImageProcessor`
loaded from a preprocessor_config.json (ties to the lowest index in both), and `palette.decode` is
HF's documented inverse rint(127.5·(clusters[id] + 1)). One caveat, HF's: it normalises pixels in
float32 (and, given float32 clusters or with its torchvision backend, takes distances as a² - 2ab + b²
in float32), so at near-ties — two centres within ~1e-7 in squared distance — it may pick the farther
one; ours is always the exact nearest. With k-means palettes this is rare (0 of 315k photo pixels in
the tests and bench); palettes with centres on pixel levels make it common.

CLI: `python -m data_tools.convert_hf {from-hf,to-hf,import-palette} ...` (see data_tools/convert_hf.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from igpt_ds.atomic import atomic_dir
from igpt_ds.checkpoint.weights import load_consolidated, save_consolidated
from igpt_ds.config import MODEL_SIZES, ConfigError, ModelConfig
from igpt_ds.data.palette import PaletteError, load_palette, validate_palette
from igpt_ds.models.igpt import IGPT, RMSNorm

HF_CONFIG_FILE = "config.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_FILE = "pytorch_model.bin"

NORM_EPS = RMSNorm(1).eps
"""The norm epsilon our model is built with; HF's `layer_norm_epsilon` must equal it."""

# ImageGPTConfig defaults for the keys that change the network, used when a config omits them
# (older configs on the Hub predate some keys). Each value here is the only one we can represent.
_REQUIRED_HF_SETTINGS: dict[str, Any] = {
    "activation_function": "quick_gelu",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": False,
}

# Buffers older HF GPT-2-style checkpoints stored (causal mask, mask fill value): not weights.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# Our Linear name -> HF Conv1D name inside block N (same names, HF weights transposed).
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---------------------------------------------------------------- configs


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig (bias=False; see `state_dict_from_hf`) for an HF ImageGPT config.json dict.

    Ignored, since they do not change the function computed: dropout rates (our model has none, and
    HF's are off in eval), `reorder_and_upcast_attn` (the same attention, computed in another order),
    `use_cache`, `initializer_range`.
    """
    if hf.get("model_type", "imagegpt") != "imagegpt":
        raise ConfigError(f"model_type is {hf['model_type']!r}, not 'imagegpt'")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(hf.get(key), int) or isinstance(hf[key], bool):
            raise ConfigError(f"HF config {key} must be an integer, got {hf.get(key)!r}")
    for key, required in _REQUIRED_HF_SETTINGS.items():
        if hf.get(key, required) != required:
            raise ConfigError(f"HF config {key}={hf[key]!r} cannot be represented (iGPT needs {required!r})")
    eps = hf.get("layer_norm_epsilon", NORM_EPS)
    if not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
        raise ConfigError(f"HF config layer_norm_epsilon={eps} cannot be represented (our norm uses {NORM_EPS})")
    n_embd, n_inner = hf["n_embd"], hf.get("n_inner")
    if n_inner not in (None, 4 * n_embd):
        raise ConfigError(f"HF config n_inner={n_inner} cannot be represented (our MLP is 4·n_embd={4 * n_embd})")
    n_positions = hf["n_positions"]
    n_px = math.isqrt(n_positions)
    if n_px * n_px != n_positions:
        raise ConfigError(f"HF config n_positions={n_positions} is not a square image (n_px²)")
    dims = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd)
    # Name the preset when the shape is one (igpt-s/m/l); explicit dims override `size` either way.
    size = next((name for name, preset in MODEL_SIZES.items() if preset == dims), ModelConfig.size)
    return ModelConfig(size=size, **dims, n_px=n_px, n_vocab=hf["vocab_size"] - 1)


def hf_config_from_model_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for `ImageGPTForCausalImageModeling` equal to our model `cfg`."""
    if cfg.objective != "ar":
        raise ConfigError(f"model.objective={cfg.objective!r}: HF ImageGPT attention is always causal ('ar' only)")
    return {
        "architectures": ["ImageGPTForCausalImageModeling"],
        "model_type": "imagegpt",
        "vocab_size": cfg.n_vocab + 1,  # + the SOS row
        "n_positions": cfg.seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "layer_norm_epsilon": NORM_EPS,
        # iGPT trains without dropout (docs/reference.md#model); HF's 0.1 default would make HF fine-tuning differ
        # from ours.
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "dtype": "float32",
        **_REQUIRED_HF_SETTINGS,
    }


def hf_preprocessor_config(palette: np.ndarray, n_px: int) -> dict[str, Any]:
    """preprocessor_config.json for `ImageGPTImageProcessor`: resize to n_px², x/127.5 - 1, nearest cluster."""
    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": np.asarray(palette, dtype=np.float32).tolist(),
        "do_color_quantize": True,
        "do_resize": True,
        "size": {"height": n_px, "width": n_px},
        # PIL bicubic, the filter of data_tools.images (HF's default is bilinear). HF squashes a non-square
        # image where we centre-crop it, so only already-square inputs resize (nearly) as our shards do.
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,  # (x/255 - 0.5) / 0.5 = x/127.5 - 1
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


# ---------------------------------------------------------------- state dicts


def state_dict_from_hf(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(cfg with `bias` decided, our fp32 state dict) from an HF ImageGPT state dict.

    Accepts `ImageGPTForCausalImageModeling` keys (`transformer.` prefix) and bare `ImageGPTModel` keys.
    A missing `lm_head` (bare model) becomes zeros, which is our head's own initialisation.
    """
    sd = {k.removeprefix("transformer."): v.float() for k, v in hf_sd.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}
    n_layer, n_vocab = cfg.n_layer, cfg.n_vocab
    bias_keys = [f"h.{i}.{name}.bias" for i in range(n_layer) for name in _CONV1D]
    has_bias = any(bool(sd[k].any()) for k in bias_keys if k in sd)
    cfg = dataclasses.replace(cfg, bias=has_bias)
    wte = _pop(sd, "wte.weight", (n_vocab + 1, cfg.n_embd))
    out = {"wte.weight": wte[:n_vocab], "sos": wte[n_vocab], "wpe.weight": sd.pop("wpe.weight", None)}
    out["lm_head.weight"] = sd.pop("lm_head.weight", torch.zeros(n_vocab, cfg.n_embd))
    out["ln_f.weight"] = sd.pop("ln_f.weight", None)
    for i in range(n_layer):
        for norm in ("ln_1", "ln_2"):
            out[f"h.{i}.{norm}.weight"] = sd.pop(f"h.{i}.{norm}.weight", None)
        for name in _CONV1D:
            key = f"h.{i}.{name}"
            weight = sd.pop(f"{key}.weight", None)
            out[f"{key}.weight"] = None if weight is None else weight.t().contiguous()
            bias = sd.pop(f"{key}.bias", None)
            if has_bias:
                out[f"{key}.bias"] = bias
    if sd:
        raise ConfigError(f"HF weights hold keys ImageGPT does not define: {sorted(sd)[:8]}")
    _check_shapes(cfg, out, "HF weights")
    return cfg, out


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `ImageGPTForCausalImageModeling` state dict (fp32) from our state dict."""
    _check_shapes(cfg, sd, "checkpoint")
    out = {
        "transformer.wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]]),  # SOS is row n_vocab
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        for norm in ("ln_1", "ln_2"):
            out[f"transformer.h.{i}.{norm}.weight"] = sd[f"h.{i}.{norm}.weight"]
        for name in _CONV1D:
            key = f"h.{i}.{name}"
            weight = sd[f"{key}.weight"]
            out[f"transformer.{key}.weight"] = weight.t()
            # HF Conv1D always has a bias; a bias-free model exports zeros.
            out[f"transformer.{key}.bias"] = sd.get(f"{key}.bias", weight.new_zeros(weight.shape[0]))
    return {k: v.float().contiguous() for k, v in out.items()}


def hf_input_ids(tokens: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """HF input_ids (B, T) whose logits equal `IGPT(tokens)`: SOS (id n_vocab), then pixels 0..T-2."""
    sos = tokens.new_full((tokens.shape[0], 1), n_vocab)
    return torch.cat([sos, tokens[:, :-1]], dim=1)


def _pop(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in sd:
        raise ConfigError(f"HF weights lack {key}")
    if tuple(sd[key].shape) != shape:
        raise ConfigError(f"HF weights {key} has shape {tuple(sd[key].shape)}, the config implies {shape}")
    return sd.pop(key)


def _check_shapes(cfg: ModelConfig, sd: dict[str, torch.Tensor | None], source: str) -> None:
    """Keys and shapes exactly those of IGPT(cfg), checked on the meta device (no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in IGPT(cfg).state_dict().items()}
    missing = sorted(k for k in expected if sd.get(k) is None)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = sorted(k for k in expected if sd.get(k) is not None and tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ConfigError(
            f"{source} do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"wrong shape {[(k, tuple(sd[k].shape), expected[k]) for k in wrong[:8]]}"
        )


# ---------------------------------------------------------------- files


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """State dict of an HF directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    hf_dir = Path(hf_dir)
    if (hf_dir / HF_WEIGHTS_FILE).is_file():
        files = [hf_dir / HF_WEIGHTS_FILE]
    elif (hf_dir / HF_WEIGHTS_INDEX).is_file():
        files = [hf_dir / shard for shard in sorted(set(_read_json(hf_dir / HF_WEIGHTS_INDEX)["weight_map"].values()))]
    elif (hf_dir / HF_TORCH_FILE).is_file():
        files = [hf_dir / HF_TORCH_FILE]
    else:
        raise ConfigError(f"{hf_dir} holds no {HF_WEIGHTS_FILE}, {HF_WEIGHTS_INDEX} or {HF_TORCH_FILE}")
    sd: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            sd.update(load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True))
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError) as e:  # truncated or foreign file
            raise ConfigError(f"cannot read {path}: {e}") from None
    return sd


def find_clusters(hf_dir: str | Path) -> Path | None:
    """The JSON file of an HF directory that holds `clusters` (image-processor config first), or None."""
    for name in (HF_PREPROCESSOR_FILE, HF_CONFIG_FILE):
        path = Path(hf_dir) / name
        if path.is_file() and "clusters" in _read_json(path):
            return path
    return None


def read_palette(src: str | Path) -> np.ndarray:
    """A (k, 3) float32 palette in [-1, 1] from kmeans_centers.npy, an HF JSON with `clusters`, or an HF dir."""
    src = Path(src)
    if src.is_dir():
        found = find_clusters(src)
        if found is None:
            raise ConfigError(f"{src}: neither {HF_PREPROCESSOR_FILE} nor {HF_CONFIG_FILE} holds `clusters`")
        src = found
    try:
        if src.suffix == ".npy":
            return load_palette(src)
        data = _read_json(src)
        if "clusters" not in data:
            raise ConfigError(f"{src} holds no `clusters`")
        try:
            clusters = np.asarray(data["clusters"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{src}: `clusters` must be a (k, 3) list of numbers") from None
        return validate_palette(clusters, str(src))
    except PaletteError as e:
        raise ConfigError(str(e)) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, palette: str | Path | None = None) -> ModelConfig:
    """HF ImageGPT directory -> consolidated checkpoint at `out_dir`; returns the model's config.

    Palette: `palette` (a file or HF dir) if given, else the clusters in `hf_dir`, else none.
    """
    cfg = model_config_from_hf(_read_json(Path(hf_dir) / HF_CONFIG_FILE))  # refuse before reading GBs of weights
    cfg, sd = state_dict_from_hf(cfg, read_hf_weights(hf_dir))
    if palette is None:
        palette = find_clusters(hf_dir)  # a directory without clusters gives a checkpoint without a palette
    colours = None if palette is None else read_palette(palette)
    if colours is not None and len(colours) != cfg.n_vocab:
        raise ConfigError(f"palette has {len(colours)} colours but the model has n_vocab={cfg.n_vocab}")
    save_consolidated(out_dir, cfg, sd, palette=colours, metadata={"converted_from": "hf-imagegpt"})
    return cfg


def convert_to_hf(ckpt_dir: str | Path, hf_dir: str | Path) -> Path:
    """Consolidated checkpoint -> HF directory (config.json, model.safetensors, and the palette as clusters)."""
    cfg, sd, palette = load_consolidated(ckpt_dir)
    hf_config, hf_sd = hf_config_from_model_config(cfg), state_dict_to_hf(cfg, sd)

    with atomic_dir(hf_dir) as tmp:
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(hf_sd, tmp / HF_WEIGHTS_FILE, metadata={"format": "pt"})  # transformers requires the format tag
        if palette is not None:
            (tmp / HF_PREPROCESSOR_FILE).write_text(json.dumps(hf_preprocessor_config(palette, cfg.n_px)) + "\n")
    return Path(hf_dir)
