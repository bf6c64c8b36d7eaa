"""Fine-tuning a pretrained iGPT for classification on DeepSpeed (docs/reference.md#evaluation).

A linear head on the mean-pooled final-norm output (`IGPT.forward_pooled`); the loss is
L_CLF + λ·L_GEN with λ = `finetune.gen_weight` (the paper found the generative term helps; 0 drops it).
By default the head is OpenAI's: zero-initialised, without a bias, on the raw pooled output (`IGPTClassifier`);
`finetune.head_bias` and `finetune.standardize_features` are named departures from it. The head may learn
faster than the backbone (`finetune.head_lr_mult`). A BERT model sees masked inputs in evaluation as in
training (OpenAI's code masks in every forward): class probabilities are averaged over `finetune.eval_masks`
masks per image, keyed by the image's index (the paper's ensembling of BERT masks); 0 evaluates unmasked.
Constant learning rate after warmup (no cosine: docs/reference.md#evaluation), early stopping on validation accuracy:
every improvement is saved to `<run>/best/` and scored on the test split at once, so the reported test
accuracy is that of the checkpoint with the best validation accuracy; test never steers anything.
Optional augmentation works on tokens: horizontal flips and translations of up to `finetune.shift`
pixels (edge pixels repeated), seeded by (seed, step, rank) so a resumed run augments identically.

Layout: DeepSpeed ZeRO (any stage; ZeRO-3 partitions the model as it is built). The pipeline layout
is refused: its engine returns only the last micro-batch's outputs from `eval_batch`, so validation
and test accuracy would need a second path through the loss function; a pipeline-pretrained
checkpoint fine-tunes here all the same (its weights are read in any layout). The pretrained weights are
read once, by rank 0, from a consolidated folder and sent to every rank; a DeepSpeed checkpoint is first exported
to one, `<run>/init_weights/`, by rank 0 alone (`export.consolidated_for_ranks`). The loop is pretraining's
(`igpt_ds.train.loop`: batches read ahead, checkpoints, resume at any world size, the schedule applied on resume,
the save-and-exit on SIGTERM / SIGUSR1); `Finetuner` is its Task.

    deepspeed --num_gpus 8 launcher/finetune.py --config launcher/configs/finetune_cifar10.yaml \\
        --train.init_from=runs/igpt-s-imagenet32
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from igpt_ds import host_sync
from igpt_ds.atomic import write_text
from igpt_ds.checkpoint import ds_checkpoint, export, resume, weights
from igpt_ds.checkpoint.weights import open_consolidated_shared
from igpt_ds.config import ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig, to_dict
from igpt_ds.data.prefetch import HostBatch, StepReader, pin, pins, read_ahead, to_device
from igpt_ds.data.sampler import GlobalBatchSampler, padded_batches
from igpt_ds.data.shards import ShardError, ShardSplit, open_shards
from igpt_ds.data.views import read_training
from igpt_ds.distributed.process_group import barrier, init_distributed
from igpt_ds.distributed.rank0 import agree_on_config, on_rank0
from igpt_ds.distributed.stop import StopSignal
from igpt_ds.models.igpt import IGPT, Linear
from igpt_ds.models.objectives import bert_mask, eval_bert_mask, objective_loss
from igpt_ds.plan.memory import checkpoint_bytes
from igpt_ds.train import loop, run_folder
from igpt_ds.train.engine import (
    build_ds_config,
    choose_policy,
    describe,
    engine_facts,
    initialize,
    model_init_context,
    resumed_engine_config,
)
from igpt_ds.train.loop import Window, train_loop


@dataclass
class FinetuneSection:
    """finetune: the classification fine-tune (L_CLF + gen_weight x L_GEN; docs/reference.md#evaluation)."""

    gen_weight: float = 1.0
    """λ in L_CLF + λ·L_GEN (paper: 1 beats 0); 0 trains the classifier loss alone."""
    patience: int = 5
    """Stop after this many evaluations without a new best validation accuracy (0 = never early)."""
    flip: bool = True
    """Augment: mirror each training image left-right with probability 1/2."""
    shift: int = 0
    """Augment: translate each training image by up to this many pixels each way (edges repeated)."""
    head_lr_mult: float = 1.0
    """The head's learning rate relative to optim.lr: a zero-initialised head has further to go than the
    pretrained backbone, which a high LR would damage."""
    head_bias: bool = False
    """Give the head a bias. OpenAI's head has none (src/model.py: clf_logits = h · wclf^T)."""
    standardize_features: bool = False
    """Feed the head the pooled features standardised by a fixed mean and std measured on `stats_images` train
    images before training (as the linear probe standardises). Not OpenAI's: its head reads the raw pooled output.
    Why one may want it: pooled features vary little across images next to their mean (std ~0.08 vs ~0.5 in a
    small model), so a zero-initialised head on raw features learns slowly at the backbone's learning rate."""
    stats_images: int = 4096
    """Train images whose pooled features give the standardisation (standardize_features only)."""
    head: str = "linear"
    """'linear': OpenAI's head on the mean-pooled final norm, the whole model fine-tuned. 'attentive': the attentive
    probe of AIM (docs/reference.md#attentive-probe): the trunk frozen, a learned query attending over every
    position's features of `probe_layer` (standardised), then a linear classifier; trained with L_CLF alone
    (gen_weight must be 0), evaluated like fine-tuning (best validation accuracy, its test accuracy)."""
    probe_layer: int = -1
    """The attentive probe's layer: l < n_layer reads LN(h^l) at every position (the linear probe's layer l before
    pooling); -1 the final norm's output."""
    attentive_heads: int = 0
    """Attention heads of the attentive probe (0: the model's n_head)."""
    eval_masks: int = 1
    """BERT models: masks per evaluation image, class probabilities averaged over them (OpenAI's code: 1, a fresh
    mask in every forward; the paper's BERT results ensemble several); 0 evaluates unmasked inputs."""
    test_split: str = "test"

    def __post_init__(self) -> None:
        if min(self.gen_weight, self.patience, self.shift, self.eval_masks) < 0 or self.head_lr_mult <= 0:
            raise ConfigError("finetune.gen_weight, patience, shift, eval_masks must be >= 0; head_lr_mult > 0")
        if self.stats_images < 1:
            raise ConfigError("finetune.stats_images must be >= 1")
        if self.head not in ("linear", "attentive"):
            raise ConfigError(f"finetune.head={self.head!r} must be 'linear' or 'attentive'")
        if self.head == "attentive" and (self.gen_weight or self.standardize_features):
            raise ConfigError("finetune.head=attentive trains its head alone on a frozen trunk, on features it "
                              "standardises itself: set finetune.gen_weight=0 and "
                              "finetune.standardize_features=false")  # fmt: skip


def _optim_defaults() -> OptimConfig:
    # About 10x below pretraining's LR and constant after warmup (docs/reference.md#evaluation).
    return OptimConfig(lr=3e-4, warmup_steps=20, schedule="constant")


@dataclass
class FinetuneConfig:
    """Fine-tuning: one configuration per run (launcher/finetune.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=_optim_defaults)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(name="finetune", eval_every=20))
    """train.init_from: the pretrained model (run folder, checkpoint of either layout, consolidated folder);
    train.eval_batches is unused: validation and test cover their whole splits."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def __post_init__(self) -> None:
        if not self.train.init_from:
            raise ConfigError("train.init_from must name the pretrained checkpoint to fine-tune")
        if self.train.layout != "zero":
            raise ConfigError(
                "train.layout=pipeline is not supported for fine-tuning (see igpt_ds.train.finetune); use zero"
            )
        if self.data.flip:
            raise ConfigError("data.flip is pretraining's flip; fine-tuning flips with finetune.flip (beside "
                              "finetune.shift's translations): set that instead")  # fmt: skip


class AttentivePooling(nn.Module):
    """AIM's attentive probe head (El-Nouby et al. 2024, apple/ml-aim `AttentionPoolingClassifier`): one learned
    query (1, C) attends, with `n_head` heads, over keys and values that are bias-free linear maps of the
    per-position features (B, T, C); the attended vector goes through a linear classifier. AIM normalises the
    features with a BatchNorm without affine parameters; here `IGPTClassifier` standardises them with per-channel
    statistics measured once on train images before training (BatchNorm's evaluation-mode statistics, the same on
    every rank, rather than running averages that differ between ranks). Weights N(0, 0.02) as GPT-2's."""

    def __init__(self, n_embd: int, n_classes: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"finetune.attentive_heads={n_head} does not divide n_embd={n_embd}")
        self.n_head = n_head
        self.query = nn.Parameter(torch.randn(1, 1, n_embd) * 0.02)
        self.k = Linear(n_embd, n_embd, bias=False, std=0.02)
        self.v = Linear(n_embd, n_embd, bias=False, std=0.02)
        self.linear = Linear(n_embd, n_classes, bias=False, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, n_classes) of features x (B, T, C)."""
        B, T, C = x.shape
        heads = lambda t: t.view(B, -1, self.n_head, C // self.n_head).transpose(1, 2)
        q = heads(self.query.to(x.dtype).expand(B, -1, -1))
        pooled = F.scaled_dot_product_attention(q, heads(self.k(x)), heads(self.v(x)))  # (B, H, 1, C / H)
        return self.linear(pooled.transpose(1, 2).reshape(B, C))


class IGPTClassifier(IGPT):
    """IGPT plus `clf_head` on the pooled final-norm output; backbone parameter names stay IGPT's.

    OpenAI's classifier (src/model.py): class logits = mean over positions of ln_f's output, times a (n_classes, C)
    matrix initialised to zero (every class starts equally likely), no bias. `bias` adds one (zero-initialised);
    `feat_mean` / `feat_std` standardise the pooled features before the head (identity unless the fine-tuner sets
    them: finetune.standardize_features).
    """

    def __init__(self, cfg: ModelConfig, n_classes: int, bias: bool = False, head: str = "linear",
                 probe_layer: int = -1, n_head: int = 0):  # fmt: skip
        super().__init__(cfg)
        self.attentive = head == "attentive"
        self.probe_layer = cfg.n_layer if probe_layer < 0 else probe_layer
        if not 0 <= self.probe_layer <= cfg.n_layer:
            raise ConfigError(f"finetune.probe_layer={probe_layer} must lie in 0..{cfg.n_layer} (or -1)")
        if self.attentive:
            for p in self.parameters():  # the trunk, frozen: only the head below trains
                p.requires_grad_(False)
            self.clf_head = AttentivePooling(cfg.n_embd, n_classes, n_head or cfg.n_head)
        else:
            self.clf_head = Linear(cfg.n_embd, n_classes, bias=bias, std=0.0)
        # Not in the state dict: set by the fine-tuner from its run state, so checkpoints keep DeepSpeed's format.
        self.register_buffer("feat_mean", torch.zeros(cfg.n_embd), persistent=False)
        self.register_buffer("feat_std", torch.ones(cfg.n_embd), persistent=False)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
        """(pixel logits (B, T, V), class logits (B, n_classes), pooled features (B, C)), in the compute dtype.
        The attentive probe: (None, class logits, probe_layer's features at every position (B, T, C)), the trunk
        run without gradients."""
        if self.attentive:
            with torch.no_grad():
                h = self.features(tokens, [self.probe_layer], mask, pool=False)[self.probe_layer]
            z = (h.float() - self.feat_mean.float()) / self.feat_std.float()
            return None, self.clf_head(z.to(h.dtype)), h
        logits, pooled = self.forward_pooled(tokens, mask)
        # Standardised in fp32 whatever the engine's precision: pooled features vary by ~0.08 around ~0.5, and in
        # bf16 (8 significant bits) (x - mean) / std would keep ~3. The head then reads them in the compute dtype
        # (pooled's), which is its weights' dtype: the engine casts parameters to bf16, never these buffers.
        z = (pooled.float() - self.feat_mean.float()) / self.feat_std.float()
        return logits, self.clf_head(z.to(pooled.dtype)), pooled

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise the head's input with `mean` and `std` (C,), kept in fp32 on the head's device. Assigned,
        not copied into the buffers: under ZeRO-3, zero.Init built those in bf16."""
        device = next(self.clf_head.parameters()).device
        self.feat_mean = mean.to(device, torch.float32)
        self.feat_std = std.to(device, torch.float32)


def gen_loss(logits: Tensor | None, tokens: Tensor, mask: Tensor | None, like: Tensor) -> Tensor:
    """L_GEN of a micro-batch; zero (on `like`'s device) for the attentive probe, whose trunk predicts nothing."""
    return like.new_zeros((), dtype=torch.float32) if logits is None else objective_loss(logits, tokens, mask)


def augment(tokens: Tensor, n_px: int, flip: bool, shift: int, gen: torch.Generator) -> Tensor:
    """Random left-right flips and translations (edge pixels repeated) of raster token images (B, T)."""
    B = tokens.shape[0]
    grid = torch.arange(n_px)
    dy, dx = torch.randint(-shift, shift + 1, (2, B), generator=gen) if shift else torch.zeros(2, B, dtype=torch.long)
    rows = (grid[None] - dy[:, None]).clamp(0, n_px - 1)  # (B, n_px): source row of each output row
    cols = (grid[None] - dx[:, None]).clamp(0, n_px - 1)
    if flip:
        cols = torch.where(torch.rand(B, generator=gen)[:, None] < 0.5, n_px - 1 - cols, cols)
    image = tokens.view(B, n_px, n_px)
    return image[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]].reshape(B, -1)


def labelled(split: ShardSplit, name: str) -> ShardSplit:
    if (split.labels < 0).any():
        raise ConfigError(
            f"split {name!r} has {int((split.labels < 0).sum())} unlabelled images; fine-tuning needs labels"
        )
    return split


class Finetuner:
    """Every rank builds one; `run()` trains with early stopping and returns the results (rank 0 logs)."""

    def __init__(self, cfg: FinetuneConfig):
        self.stop = StopSignal(cfg.train.stop_check_every)  # preemption, time limit, launcher gone: save, exit
        self.cfg, t = cfg, cfg.train
        self.rank, self.world = init_distributed(t.dist_timeout_s)
        agree_on_config(to_dict(cfg))
        policy = choose_policy(t, None, self.world)  # provisional: the model comes with its weights
        ds_config = build_ds_config(t, cfg.optim, self.world, policy=policy)  # checks before work
        run_folder.claim(t.run_dir)  # this run's alone, and writable, before anything is read from or written to it

        def data_identity() -> dict[str, Any]:
            try:
                return resume.data_identity(ShardSplit(cfg.data.shards, cfg.data.train_split), cfg.data)
            except ShardError as e:
                raise ConfigError(str(e)) from None

        self.data = on_rank0(data_identity)  # read once, for every rank
        # One decision for every rank, by rank 0, checked against this run before anything is built.
        resuming = resume.resume_plan(t.run_dir, model=None, layout="zero", world=self.world, dp=self.world,
                                         ds_config=ds_config, data=self.data, seed=t.seed,
                                         reset_data_position=t.reset_data_position,
                                         stage_from_checkpoint=policy.follows_checkpoint,
                                         fallback=t.resume_fallback)  # fmt: skip
        ckpt = resuming.ckpt if resuming is not None else None
        if ckpt is None:
            init = export.consolidated_for_ranks(t.init_from, t.run_dir / "init_weights")
            self.model_cfg, state, palette = open_consolidated_shared(init)  # read by rank 0, shared
        else:  # resuming: the weights come from the run's own checkpoint
            self.model_cfg, state, palette = ds_checkpoint.model_config(ckpt), None, ds_checkpoint.palette(ckpt)
        splits = (cfg.data.train_split, cfg.data.val_split, cfg.finetune.test_split)
        self.train, self.val, self.test = (labelled(open_shards(self.model_cfg, cfg.data, s), s) for s in splits)
        ds_checkpoint.check_palette(palette, self.train, ckpt or t.init_from)
        self.palette = palette if palette is not None else self.train.palette
        self.n_classes = len(self.train.class_names) or int(self.train.labels.max()) + 1
        policy = choose_policy(t, self.model_cfg, self.world)
        ds_config = build_ds_config(t, cfg.optim, self.world, model=self.model_cfg, policy=policy)
        self.checkpoint_bytes = checkpoint_bytes(self.model_cfg, ds_config)
        run_folder.check_room(t.run_dir, self.checkpoint_bytes, t.keep_checkpoints + 1)  # + best/
        if resuming is not None:
            ds_config, policy = resumed_engine_config(resuming, t, cfg.optim, self.world, self.model_cfg,
                                                                    policy)  # fmt: skip
        torch.manual_seed(t.seed)
        with model_init_context(ds_config):
            ft = cfg.finetune
            model = IGPTClassifier(self.model_cfg, self.n_classes, bias=ft.head_bias, head=ft.head,
                                   probe_layer=ft.probe_layer, n_head=ft.attentive_heads)  # fmt: skip
        model.activation_checkpointing = t.activation_checkpointing
        head = [p for n, p in model.named_parameters() if n.startswith(weights.FINETUNE_HEAD)]
        body = [p for n, p in model.named_parameters() if not n.startswith(weights.FINETUNE_HEAD)]
        groups = [{"params": head, "lr": cfg.optim.lr * cfg.finetune.head_lr_mult}]
        if not model.attentive:  # the attentive probe's trunk is frozen: no optimizer state for it
            groups.insert(0, {"params": body})
        self.engine = initialize(model, ds_config, cfg.optim, t.max_steps, groups, compile_model=t.compile)
        if state is not None:  # the pretrained backbone; the head keeps its (zero) initialisation
            weights.load_weights(self.engine, state, f"train.init_from={t.init_from}")
        self.sampler = GlobalBatchSampler(len(self.train), t.global_batch, self.rank, self.world, t.seed)
        self.reader = StepReader(self.read_step, self.sampler)
        self.state: dict[str, Any] = {"step": 0, "best": None, "bad_evals": 0, "start_val_acc": None, "done": False}
        if resuming is not None:
            step = loop.restore(self.engine, resuming, self.sampler, t.reset_data_position)
            self.state.update(resuming.meta["finetune"], step=step)
        elif cfg.finetune.standardize_features or model.attentive:
            self.state["feat_stats"] = self.feature_stats()
        mean, std = self.state.get("feat_stats", ([0.0] * self.model_cfg.n_embd, [1.0] * self.model_cfg.n_embd))
        self.engine.module.set_feature_stats(torch.tensor(mean), torch.tensor(std))  # identity unless standardising
        header = describe(engine_facts(ds_config, t, self.world, policy))
        resolved = {**to_dict(cfg), "model": asdict(self.model_cfg)}
        self.files, self.writer = run_folder.open_run(t.run_dir, resolved, ds_config, self.rank, self.state["step"],
                                                      header)  # fmt: skip
        if resuming is not None:
            self.log_line(run_folder.resumed_line(resuming, self.state["step"], t.reset_data_position))

    def log_line(self, line: str, step: int | None = None, scalars: dict[str, float] | None = None) -> None:
        """Rank 0: `scalars` to TensorBoard at `step`, and `line` to the console."""
        if self.writer is None:
            return
        for k, v in (scalars or {}).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        print(line, flush=True)

    def losses(self, tokens: Tensor, labels: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(L_CLF, L_GEN, correct count) of one micro-batch through the engine."""
        logits, class_logits, _ = self.engine(tokens, mask)
        clf = F.cross_entropy(class_logits.float(), labels)
        return clf, gen_loss(logits, tokens, mask, clf), (class_logits.argmax(dim=1) == labels).sum()

    def frozen_batches(self, split: ShardSplit, n: int) -> Iterator[tuple[int, np.ndarray, Tensor, Tensor]]:
        """(rows, image indices, tokens, labels) of this rank's slice of split[0:n], in eval mode without gradients,
        read ahead on the host and copied without blocking. Every rank yields the same number of batches (ZeRO-3
        gathers parameters collectively): a rank out of rows gets one repeated row with rows = 0, for the caller to
        leave uncounted."""

        def host() -> Iterator[HostBatch]:
            for part in padded_batches(n, self.rank, self.world, self.cfg.train.micro_batch):
                idx = part if len(part) else np.zeros(1, np.int64)
                yield (len(part), idx, *map(torch.from_numpy, split.batch(idx)))

        self.engine.eval()
        with torch.no_grad():
            for k, idx, tokens, labels in read_ahead(host(), pin_memory=self.pinned):
                yield (k, idx, *to_device((tokens, labels), self.engine.device))
        self.engine.train()

    def eval_mask(self, idx: np.ndarray, j: int) -> Tensor | None:
        """Mask j of evaluation images `idx` for a BERT model (keyed by image index: the same at any world size
        and batching); None for AR or with finetune.eval_masks = 0."""
        m = self.model_cfg
        if m.objective != "bert" or self.cfg.finetune.eval_masks == 0:
            return None
        mask = (eval_bert_mask(m, idx, j),)
        return to_device(pin(mask) if self.pinned else mask, self.engine.device)[0]

    @property
    def pinned(self) -> bool:
        """Whether host batches are pinned: on a GPU, so that copies to it do not block."""
        return pins(self.engine.device)

    def feature_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the pretrained model's features over the first train images: the pooled
        ones (finetune.standardize_features), or the attentive probe's layer over every position."""
        sums = torch.zeros(3, self.model_cfg.n_embd, dtype=torch.float64, device=self.engine.device)
        n = min(len(self.train), self.cfg.finetune.stats_images)
        for k, idx, tokens, _ in self.frozen_batches(self.train, n):
            f = self.engine(tokens, self.eval_mask(idx, 0))[2].double()[:k]
            first, second = (f.mean(1), (f * f).mean(1)) if f.dim() == 3 else (f, f * f)
            sums += torch.stack([first.sum(0), second.sum(0), first.new_full(first.shape[1:], k)])
        dist.all_reduce(sums)
        mean = sums[0] / sums[2]
        std = (sums[1] / sums[2] - mean * mean).clamp_min(0).sqrt()
        std = torch.where(std < 1e-6, 1.0, std)  # a constant feature stays at zero rather than blowing up
        with host_sync.deliberate():
            return mean.tolist(), std.tolist()

    def read_step(self, indices: np.ndarray, epochs: np.ndarray, step: int) -> list[HostBatch]:
        """Step `step`'s micro-batches on the host (`StepReader` calls it a step ahead, in its thread): (tokens,
        labels, BERT mask or None) of the samples `indices` in epochs `epochs` (their stored views with
        data.views, `igpt_ds.data.views`), augmented and masked from a generator keyed by (seed, step, rank), pinned
        on a GPU."""
        ft, n_px, m = self.cfg.finetune, self.model_cfg.n_px, self.model_cfg
        gen = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step) * 4096 + self.rank)
        out = []
        n_micro = len(indices) // self.cfg.train.micro_batch
        for chunk, when in zip(np.split(np.asarray(indices), n_micro), np.split(epochs, n_micro), strict=True):
            rows = read_training(self.train, chunk, when, self.cfg.train.seed, self.cfg.data)
            tokens, labels = map(torch.from_numpy, rows)
            tokens = augment(tokens, n_px, ft.flip, ft.shift, gen) if ft.flip or ft.shift else tokens
            mask = bert_mask(tokens.shape, m.mask_prob, gen, kind=m.bert_mask) if m.objective == "bert" else None
            out.append(pin((tokens, labels, mask)) if self.pinned else (tokens, labels, mask))
        return out

    # The Task of train_loop -----------------------------------------------------------------------------------

    def step(self, batches: list[HostBatch], step: int) -> Tensor:
        """One optimizer step; sums (L_CLF, L_GEN, correct, images) of this rank's micro-batches, on the device."""
        sums = torch.zeros(4, device=self.engine.device)
        for host in batches:
            tokens, labels, mask = to_device(host, self.engine.device)
            clf, lgen, correct = self.losses(tokens, labels, mask)
            self.engine.backward(clf + self.cfg.finetune.gen_weight * lgen)
            self.engine.step()
            n = len(tokens)
            sums += torch.stack([clf.detach() * n, lgen.detach() * n, correct.float(), clf.new_full((), n)])
        return sums

    def evaluate(self, split: ShardSplit) -> dict[str, float]:
        """Accuracy and losses over a whole split, each rank a slice. A BERT model's inputs are masked as in
        training, class probabilities averaged over finetune.eval_masks masks (`eval_mask`); unmasked with 0
        (the gen loss is then over visible pixels, not comparable with training's)."""
        n_masks = max(1, self.cfg.finetune.eval_masks) if self.model_cfg.objective == "bert" else 1
        sums = torch.zeros(4, device=self.engine.device)
        for k, idx, tokens, labels in self.frozen_batches(split, len(split)):
            probs, lgen = 0.0, 0.0
            for j in range(n_masks):
                mask = self.eval_mask(idx, j)
                logits, class_logits, _ = self.engine(tokens, mask)
                probs = probs + class_logits.float().softmax(dim=1) / n_masks
                lgen = lgen + gen_loss(logits, tokens, mask, class_logits) / n_masks
            clf = F.nll_loss(probs.clamp_min(1e-30).log(), labels)
            correct = (probs.argmax(dim=1) == labels).sum()
            sums += torch.stack([clf * k, lgen * k, correct.float() * (k > 0), clf.new_full((), k)])
        dist.all_reduce(sums)
        with host_sync.deliberate():
            clf, lgen, correct, count = sums.tolist()
        return {"clf_loss": clf / count, "gen_loss": lgen / count, "acc": 100.0 * correct / count}

    def log(self, step: int, sums: Tensor, lrs: list[float], window: Window) -> None:
        """L_CLF, L_GEN and accuracy over the window and the ranks (one sync), the backbone's and the head's rates."""
        dist.all_reduce(sums)
        with host_sync.deliberate():
            clf, lgen, correct, count = sums.tolist()
        scalars = {"train/clf_loss": clf / count, "train/gen_loss": lgen / count, "train/acc": 100.0 * correct / count,
                   "train/lr": lrs[0], "train/lr_head": lrs[-1]}  # fmt: skip
        line = (f"step {step}/{self.cfg.train.max_steps} clf loss {scalars['train/clf_loss']:.4f} gen loss "
                f"{scalars['train/gen_loss']:.4f} acc {scalars['train/acc']:.2f}%")  # fmt: skip
        self.log_line(line, step, scalars)

    def after_step(self, step: int) -> bool:
        """Validation every train.eval_every steps and at train.max_steps; True when early stopping says so or the
        schedule is over."""
        t = self.cfg.train
        self.state["step"] = step
        if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
            self.state["done"] = self.validate(step) or step == t.max_steps
        return self.state["done"]

    def save(self, step: int) -> None:
        self.state["step"] = step
        self.save_to("checkpoints", self.cfg.train.keep_checkpoints)

    def say(self, line: str) -> None:
        self.log_line(line)

    # ----------------------------------------------------------------------------------------------------------

    def save_to(self, root: str, keep: int) -> None:
        """A checkpoint of the current step under `<run>/<root>`, keeping `keep` (`best/` keeps one)."""
        loop.save_checkpoint(self.engine, self.cfg.train.run_dir / root, self.state["step"], self.sampler, self.data,
                             "zero", self.world, self.files, self.palette, keep, self.checkpoint_bytes,
                             finetune=self.state)  # fmt: skip

    def validate(self, step: int) -> bool:
        """Evaluate on val; on a new best save it to best/ and score it on test. True = stop early."""
        val, s = self.evaluate(self.val), self.state
        scalars = {f"val/{k}": v for k, v in val.items()}
        if s["start_val_acc"] is None:
            s["start_val_acc"] = val["acc"]
        improved = s["best"] is None or val["acc"] > s["best"]["val_acc"]
        if improved:
            test = self.evaluate(self.test)
            s["bad_evals"], s["best"] = 0, {"step": step, "val_acc": val["acc"], "test_acc": test["acc"]}
            scalars["test/acc_at_best_val"] = test["acc"]
            self.save_to("best", keep=1)
        else:
            s["bad_evals"] += 1
        best = s["best"]
        line = f"step {step} val acc {val['acc']:.2f}% clf loss {val['clf_loss']:.4f} gen loss {val['gen_loss']:.4f}"
        line += f" | best val {best['val_acc']:.2f}% (step {best['step']}, test {best['test_acc']:.2f}%)"
        self.log_line(line, step, scalars)
        patience = self.cfg.finetune.patience
        return bool(patience) and s["bad_evals"] >= patience

    def run(self) -> dict[str, Any]:
        """Validate the starting point (once per run), then the shared loop; results.json and the summary line."""
        t, s = self.cfg.train, self.state
        if s["start_val_acc"] is None:
            self.validate(0)  # the starting point, so improvement is visible
        first, tic = s["step"], time.perf_counter()
        end = train_loop(self, self.engine, self.reader, self.stop, t, s["step"], done=s["done"])
        seconds = time.perf_counter() - tic
        s["step"] = end.step
        results = {"steps": s["step"], "finished": s["done"], "start_val_acc": s["start_val_acc"], "best": s["best"],
                   "best_checkpoint": str(t.run_dir / "best"), "n_classes": self.n_classes,
                   "stopped_by": end.stopped_by}  # fmt: skip
        if self.engine.module.attentive:
            epochs = (s["step"] - first) * t.global_batch / len(self.train)
            ft = self.cfg.finetune
            results["attentive"] = {"probe_layer": self.engine.module.probe_layer,
                                    "heads": ft.attentive_heads or self.model_cfg.n_head,
                                    "seconds_per_epoch": seconds / epochs if epochs else None}  # fmt: skip
        if self.writer is not None:
            write_text(t.run_dir / "results.json", json.dumps(results, indent=2) + "\n")
            b = s["best"]
            self.log_line(f"fine-tuning {'done' if s['done'] else 'paused'} at step {s['step']}: validation "
                          f"{s['start_val_acc']:.2f}% -> best {b['val_acc']:.2f}% at step {b['step']}, test "
                          f"{b['test_acc']:.2f}%; {t.run_dir / 'results.json'}")  # fmt: skip
            self.writer.close()
        barrier()  # every rank's writes are done before any exits: a launcher may kill the rest when one exits non-zero
        return results


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune per `cfg` on every rank, resuming from the run's latest checkpoint."""
    return Finetuner(cfg).run()
