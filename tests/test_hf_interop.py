"""HF ImageGPT interop: our model reproduces transformers' ImageGPT logit for logit, both directions.

The reference models are built locally from transformers' classes (tiny config, nothing downloads)
with every weight redrawn — non-zero biases, norm gains away from 1, a non-zero head — because HF's
own init (zero biases, unit gains, 0.02 weights) would hide mistakes in the mapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools.convert_hf import main
from igpt_ds.checkpoint.hf_interop import (
    convert_from_hf,
    convert_to_hf,
    hf_config_from_model_config,
    hf_input_ids,
    model_config_from_hf,
    read_palette,
)
from igpt_ds.checkpoint.weights import load_consolidated, save_consolidated
from igpt_ds.config import ConfigError, ModelConfig
from igpt_ds.data.palette import build_lut, decode, encode, encode_bruteforce, fit_palette, to_unit
from igpt_ds.models.igpt import IGPT

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent

N_VOCAB, N_PX = 16, 8
# fp32; the two implementations order their sums differently (SDPA vs eager attention), so not bitwise.
ATOL = RTOL = 1e-5


def hf_config(**overrides) -> transformers.ImageGPTConfig:
    base = dict(vocab_size=N_VOCAB + 1, n_positions=N_PX**2, n_embd=32, n_layer=2, n_head=2)
    return transformers.ImageGPTConfig(**{**base, **overrides})


def redraw(model: torch.nn.Module, bias: bool, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: matrices N(0, 0.2²), norm gains U(0.5, 1.5), biases N(0, 0.1²) or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 * bias)
            elif p.ndim == 1 and name != "sos":  # norm gains
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()  # HF: dropout off


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "nobias"])
def hf_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = redraw(transformers.ImageGPTForCausalImageModeling(hf_config()), bias=request.param)
    path = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(path)
    return path, model, request.param


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, N_VOCAB, (batch, N_PX**2), generator=torch.Generator().manual_seed(seed))


def load_ours(ckpt) -> IGPT:
    cfg, sd, _ = load_consolidated(ckpt)
    model = IGPT(cfg).eval()
    model.load_state_dict(sd)
    return model


@torch.no_grad()
def test_from_hf_logits_equal_hf(hf_dir, tmp_path):
    path, hf, bias = hf_dir
    cfg = convert_from_hf(path, tmp_path / "ours")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_px, cfg.n_vocab) == (2, 2, 32, N_PX, N_VOCAB)
    assert cfg.bias == bias  # biases kept only when some are non-zero
    ours, x = load_ours(tmp_path / "ours"), tokens()
    expected = hf(hf_input_ids(x, N_VOCAB)).logits
    assert expected.abs().max() > 1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_hf_round_trip_is_bitwise(hf_dir, tmp_path):
    path, hf, _ = hf_dir
    convert_from_hf(path, tmp_path / "ours")
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "back")
    for name, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@torch.no_grad()
def test_to_hf_logits_equal_ours(bias, tmp_path):
    cfg = ModelConfig(n_px=N_PX, n_vocab=N_VOCAB, bias=bias)
    ours = redraw(IGPT(cfg), bias=bias, seed=2)
    save_consolidated(tmp_path / "ours", cfg, ours.state_dict())
    convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    x = tokens()
    torch.testing.assert_close(hf(hf_input_ids(x, N_VOCAB)).logits, ours(x), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_losses_agree_on_pixels_both_predict(hf_dir, tmp_path):
    """HF's loss scores pixels 0..T-2 (shifted labels, no position predicts the last); ours all T."""
    path, hf, _ = hf_dir
    convert_from_hf(path, tmp_path / "ours")
    ours, x = load_ours(tmp_path / "ours"), tokens()
    ids = hf_input_ids(x, N_VOCAB)
    per_pixel = F.cross_entropy(ours(x).transpose(1, 2), x, reduction="none")  # (B, T)
    hf_loss = hf(ids, labels=ids).loss
    torch.testing.assert_close(hf_loss, per_pixel[:, :-1].mean(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.loss(x), per_pixel.mean())


@pytest.mark.parametrize("layout", ["sharded-safetensors", "legacy-pytorch-bin"])
@torch.no_grad()
def test_other_hf_weight_layouts_convert(hf_dir, layout, tmp_path):
    """Sharded safetensors (big models) and the Hub's older pytorch_model.bin with its mask buffers."""
    path, hf, _ = hf_dir
    if layout == "sharded-safetensors":
        hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    else:
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_bytes((path / "config.json").read_bytes())
        sd = dict(hf.state_dict())
        for i in range(2):
            sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, N_PX**2, N_PX**2, dtype=torch.bool).tril()
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    ours, x = load_ours(tmp_path / "ours"), tokens()
    torch.testing.assert_close(ours(x), hf(hf_input_ids(x, N_VOCAB)).logits, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_bare_imagegpt_model_converts_with_zero_head(tmp_path):
    """An `ImageGPTModel` directory has no lm_head: features still match, the head is our zero init."""
    torch.manual_seed(0)
    hf = redraw(transformers.ImageGPTModel(hf_config()), bias=True)
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    ours, x = load_ours(tmp_path / "ours"), tokens()
    assert not ours.lm_head.weight.any()
    pooled = ours.features(x, [ours.cfg.n_layer])[ours.cfg.n_layer]
    expected = hf(hf_input_ids(x, N_VOCAB)).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(activation_function="gelu_new"), "activation_function"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(n_inner=64), "n_inner"),
        (dict(n_positions=60), "square"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(model_type="gpt2"), "model_type"),
        (dict(n_embd="32"), "n_embd"),
    ],
)
def test_unrepresentable_hf_configs_are_refused(override, message):
    base = hf_config().to_dict()
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf({**base, **override})


def test_hf_config_round_trips_and_names_presets():
    cfg = ModelConfig(size="igpt-s", n_vocab=512)
    back = model_config_from_hf(hf_config_from_model_config(cfg))
    assert back == cfg and back.size == "igpt-s"
    with pytest.raises(ConfigError, match="causal"):
        hf_config_from_model_config(ModelConfig(objective="bert"))


def test_cli_converts_both_ways_and_refuses_to_clobber(hf_dir, tmp_path, capsys):
    path, _, _ = hf_dir
    assert main(["from-hf", str(path), str(tmp_path / "ours")]) == 0
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == N_VOCAB + 1
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf"), "--overwrite"]) == 0


def test_cli_user_errors_exit_2_and_write_nothing(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**hf_config().to_dict(), "activation_function": "relu"}))
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["from-hf", str(bad), str(tmp_path / "out")]) == 2
    assert main(["from-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    (bad / "config.json").write_text(json.dumps(hf_config().to_dict()))
    assert main(["from-hf", str(bad), str(tmp_path / "out")]) == 2  # unreadable weights
    assert main(["import-palette", str(bad), str(tmp_path / "p.npy")]) == 2  # no clusters anywhere
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no outputs, no temporary leftovers


def test_cli_runs_as_a_module(tmp_path):
    """The real entry point in a subprocess: a user error exits 2 with one line on stderr, output untouched."""
    (tmp_path / "p.npy").write_bytes(b"keep")
    src = tmp_path / "kmeans_centers.npy"
    np.save(src, np.zeros((4, 3), np.float32))
    cmd = [sys.executable, "-m", "data_tools.convert_hf", "import-palette", str(src), str(tmp_path / "p.npy")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--overwrite" in done.stderr, done.stderr
    assert (tmp_path / "p.npy").read_bytes() == b"keep"


def test_palette_import_from_openai_npy_and_hf_json(tmp_path):
    centers = np.random.default_rng(0).uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centers)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": centers.tolist()}))
    for src in ("kmeans_centers.npy", "preprocessor_config.json", "."):
        assert main(["import-palette", str(tmp_path / src), str(tmp_path / "out.npy"), "--overwrite"]) == 0
        out = np.load(tmp_path / "out.npy")
        assert out.dtype == np.float32 and np.array_equal(out, centers)
    np.save(tmp_path / "bytes.npy", centers * 127.5 + 127.5)  # 0..255: another convention
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        read_palette(tmp_path / "bytes.npy")


# ---------------------------------------------------------------- palette: our encoder vs HF's processor


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """scikit-learn's two bundled 427x640 photos as uint8 batches: resized to 32x32, 32x32 crops, 160x107."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(0)
    resized = [np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images]
    crops = [im[r : r + 32, c : c + 32] for im in images for r, c in rng.integers(0, 395, (8, 2))]
    mid = [np.asarray(Image.fromarray(im).resize((160, 107), Image.BILINEAR)) for im in images]
    return [np.stack(resized + crops), np.stack(mid)]  # HF's numpy backend wants one shape per call


@pytest.fixture(scope="module")
def kmeans_palette(photos) -> np.ndarray:
    """128 k-means centres of the photos, then the same centres again in reverse: exact ties on purpose."""
    from sklearn.datasets import load_sample_images

    pixels = np.concatenate([im.reshape(-1, 3) for im in load_sample_images().images])
    centres = fit_palette(pixels[np.random.default_rng(0).permutation(len(pixels))[:20000]], k=128, max_iter=10)
    return np.concatenate([centres, centres[::-1]])


@pytest.fixture(scope="module")
def kmeans_lut(kmeans_palette) -> np.ndarray:
    return build_lut(kmeans_palette)


def hf_ids(processor, batch: np.ndarray) -> np.ndarray:
    return np.stack(processor(list(batch), do_resize=False, return_tensors="np")["input_ids"]).reshape(batch.shape[:3])


def test_tokens_equal_hf_image_processor_on_photos(photos, kmeans_palette, kmeans_lut, tmp_path):
    """HF's processor built from our exported preprocessor_config.json picks our token for every pixel."""
    cfg = ModelConfig(n_px=32, n_vocab=len(kmeans_palette))
    save_consolidated(tmp_path / "ours", cfg, IGPT(cfg).state_dict(), palette=kmeans_palette)
    convert_to_hf(tmp_path / "ours", tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    for batch in photos:
        ours = encode(batch, kmeans_lut).astype(np.int64)
        np.testing.assert_array_equal(hf_ids(processor, batch), ours)
        assert ours.max() < 128  # duplicated centres: both sides break the tie to the lower index
    # The exported config resizes to n_px x n_px; on images already that size it changes nothing.
    resized = np.stack(processor(list(photos[0]), return_tensors="np")["input_ids"]).reshape(photos[0].shape[:3])
    np.testing.assert_array_equal(resized, encode(photos[0], kmeans_lut))


def test_decoder_inverts_hf_tokens_like_hf(photos, kmeans_palette, kmeans_lut):
    """decode() on HF's ids equals HF's documented inverse rint(127.5·(clusters[id] + 1)), and ours on ours."""
    processor = transformers.ImageGPTImageProcessor(clusters=kmeans_palette.astype(np.float64))
    for batch in photos:
        theirs = hf_ids(processor, batch)
        hf_inverse = np.rint(127.5 * (processor.clusters[theirs] + 1.0)).astype(np.uint8)
        np.testing.assert_array_equal(decode(theirs, kmeans_palette), hf_inverse)
        np.testing.assert_array_equal(decode(encode(batch, kmeans_lut), kmeans_palette), hf_inverse)


@pytest.mark.parametrize("case", ["lattice-float64", "kmeans-float32"])
def test_hf_disagrees_only_at_float32_near_ties(case, photos, kmeans_palette, kmeans_lut):
    """Where HF's ids differ from ours, ours is the exact nearest centre and HF's is farther by < 1e-6.

    HF normalises pixels in float32 and, given float32 clusters (or with its torchvision backend),
    computes a² - 2ab + b² in float32: near-ties go either way. A lattice palette (centres on pixel
    levels) makes near-ties common; k-means palettes, like OpenAI's, make them rare.
    """
    if case == "lattice-float64":
        levels = np.arange(0, 256, 34)
        lattice = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
        centres, clusters = to_unit(lattice).astype(np.float32), to_unit(lattice)
        lut = build_lut(centres)
    else:
        centres, clusters, lut = kmeans_palette, kmeans_palette, kmeans_lut
    processor = transformers.ImageGPTImageProcessor(clusters=clusters)
    batch = photos[1]
    ours = encode(batch, lut).astype(np.int64)
    np.testing.assert_array_equal(ours, encode_bruteforce(batch, centres))
    theirs = hf_ids(processor, batch)
    differ = ours != theirs
    x, c = to_unit(batch[differ]), centres.astype(np.float64)
    gap = ((x - c[theirs[differ]]) ** 2).sum(-1) - ((x - c[ours[differ]]) ** 2).sum(-1)
    assert (gap > 0).all() and (gap < 1e-6).all()
    assert differ.mean() < 0.1
