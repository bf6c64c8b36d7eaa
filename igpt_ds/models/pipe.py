"""The iGPT of `igpt_ds.models.igpt` as DeepSpeed pipeline stages (pipeline x data parallel, ZeRO-1).

Layers, in order: `EmbedPipe` (SOS + token + position embeddings) -> n_layer x `model.Block` ->
`HeadPipe` (final norm + output head); `pipe_loss` runs on the last stage. DeepSpeed splits the list
into `train.pipeline_stages` stages balanced by parameter count. Activation checkpointing covers
the blocks only: checkpointing the embedding fails in DeepSpeed's reentrant checkpoint ("element 0
of tensors does not require grad", docs/reference.md#deepspeed).

Only tensors travel between stages, so the BERT objective is encoded in the tensors themselves:
masked input pixels carry the out-of-vocabulary id n_vocab, and labels are -100 (ignored) at
unmasked positions. `bert_pipe_batch` builds that encoding.

Layer idx of the pipeline saves `layer_{idx:02d}-model_states.pt` holding that layer's own
state dict; `igpt_name(idx, key, n_layer)` maps it to the IGPT name (block i+1 <-> `h.i.`), so the
same consolidated weights (igpt_ds.checkpoint.weights) load into and export from both layouts.

Launch: `deepspeed --num_gpus 8 launcher/pretrain.py --config launcher/configs/igpt_l_pipeline.yaml`.
"""

from __future__ import annotations

import glob
import os
import re

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import Tensor, nn

from igpt_ds.config import ModelConfig
from igpt_ds.models.igpt import IGPT, Block, Linear, RMSNorm, add_input_embeddings, seed_layer
from igpt_ds.models.objectives import IGNORE_INDEX, per_image_loss


class EmbedPipe(nn.Module):
    """Stage-0 layer: tokens (B, T) -> input embeddings (B, T, C); id n_vocab marks a BERT mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        add_input_embeddings(self, cfg)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = tokens == self.cfg.n_vocab if self.cfg.objective == "bert" else None
        if mask is not None:
            tokens = tokens.masked_fill(mask, 0)
        # The same computation as the monolithic model, on this layer's own parameters.
        return IGPT.embed(self, tokens, mask)


class HeadPipe(nn.Module):
    """Last-stage layer: final norm and output head -> logits (B, T, n_vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = Linear(cfg.n_embd, cfg.n_vocab, bias=False, std=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))


def pipe_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`objectives.objective_loss` from the labels alone (nats/pixel, fp32): the mean over images of each image's mean
    cross-entropy over its labelled positions (AR: all of them; BERT: the masked ones)."""
    return per_image_loss(logits, labels.clamp_min(0), labels != IGNORE_INDEX)


class SeededLayerSpec(LayerSpec):
    """A LayerSpec whose layer is built right after `seed_layer(seed, layer_idx)`. DeepSpeed builds the specs
    of every stage on every rank to count their parameters, then each stage its own layers; without a seed
    per layer, the first blocks of different stages would start from the same RNG state: identical weights."""

    def __init__(self, seed: int, layer_idx: int, typename: type, *module_args):
        super().__init__(typename, *module_args)
        self.seed, self.layer_idx = seed, layer_idx

    def build(self, log: bool = False) -> nn.Module:
        seed_layer(self.seed, self.layer_idx)
        return super().build(log)


class IGPTPipe(PipelineModule):
    def __init__(self, cfg: ModelConfig, num_stages: int, activation_checkpointing: bool = False, seed: int = 0):
        """`seed`: layer i starts from the weights `IGPT(cfg, seed)` gives it, whatever the stage count."""
        self.cfg = cfg
        layers = [
            SeededLayerSpec(seed, 0, EmbedPipe, cfg),
            *(SeededLayerSpec(seed, i + 1, Block, cfg) for i in range(cfg.n_layer)),
            SeededLayerSpec(seed, cfg.n_layer + 1, HeadPipe, cfg),
        ]
        super().__init__(
            layers=layers,
            num_stages=num_stages,
            loss_fn=pipe_loss,
            partition_method="parameters",
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            checkpointable_layers=["Block"],
        )

    def local_layers(self) -> list[tuple[int, nn.Module]]:
        """(global layer index, layer) for the layers this stage holds."""
        return [(self._local_start + i, layer) for i, layer in enumerate(self.forward_funcs)]


def igpt_name(layer_idx: int, key: str, n_layer: int) -> str:
    """Pipeline layer `layer_idx`'s parameter `key` under its IGPT name."""
    return f"h.{layer_idx - 1}.{key}" if 1 <= layer_idx <= n_layer else key


def state_dict_from_layer_files(ckpt_dir: str | os.PathLike, n_layer: int) -> dict[str, Tensor]:
    """IGPT-named fp32 state dict from a pipeline checkpoint's `layer_XX-model_states.pt` files.

    These hold the module weights in training precision: exact for fp32 training; under bf16 use
    `state_dict_from_universal` for the fp32 masters.
    """
    out = {}
    for path in glob.glob(os.path.join(ckpt_dir, "layer_*-model_states.pt")):
        idx = int(re.search(r"layer_(\d+)-", os.path.basename(path)).group(1))
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            out[igpt_name(idx, key, n_layer)] = value.float()
    return out


def state_dict_from_universal(universal_dir: str | os.PathLike, n_layer: int) -> dict[str, Tensor]:
    """IGPT-named fp32 master weights from the universal form of a pipeline checkpoint
    (`zero/<layer>.<key>/fp32.pt`, written by deepspeed.checkpoint.ds_to_universal)."""
    out = {}
    for path in glob.glob(os.path.join(universal_dir, "zero", "*", "fp32.pt")):
        idx, key = os.path.basename(os.path.dirname(path)).split(".", 1)
        out[igpt_name(int(idx), key, n_layer)] = torch.load(path, map_location="cpu", weights_only=False)["param"]
    return out


def bert_pipe_batch(tokens: Tensor, mask: Tensor, n_vocab: int) -> tuple[Tensor, Tensor]:
    """(inputs with masked pixels set to n_vocab, labels with unmasked pixels ignored)."""
    return tokens.masked_fill(mask, n_vocab), tokens.masked_fill(~mask, IGNORE_INDEX)
