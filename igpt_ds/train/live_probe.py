"""The live linear probe: representation quality during pretraining, the paper's Figure 3 in every run.

Every `train.probe_every` steps (and at step 0 with `train.probe_at_start`), on a fixed labelled subset of the
shards — `train.probe_images` train images to fit, `train.probe_val_images` validation images to score, evenly
spaced over each split — every rank extracts the pooled features f^l = mean_t LN(h^l) of `train.probe_layers`
(`IGPT.features`; a BERT model's input masked as in training, `objectives.eval_bert_mask`) for its rows. Then each
layer's rows are gathered to one rank, its owner (the layers dealt round-robin over the ranks), and every owner fits
its layers' multinomial logistic regressions alone, with no collective inside a fit, all owners at once, with the
linear probe's own solver (`igpt_ds.eval.logreg` with `LOCAL`: standardised with the subset's train statistics,
L-BFGS warm-started over `C_GRID` by `logreg.sweep_c`, C chosen on the subset's validation images, on the GPU where
there is one); the ranks meet by polling while the owners fit (`rank0.on_every_rank`), never inside a long
collective, and share the accuracies. The solver's block sums are exact and order-free, so a layer fitted on one rank
gives bit for bit what the ranks fitting it together gave before (and at any data-parallel size).

Why this design: a data-parallel fit makes one all-reduce per L-BFGS evaluation (tens per C, 4 C values, every
layer in turn), all ranks waiting on each; a few thousand probe rows are small enough to fit on one device, so the
collectives inside the fits are replaced by one gather of (probe_images + probe_val_images) x n_embd floats per
layer, and the layers are fitted in parallel: the fitting time goes from (L + 1) fits, each slowed by its
collectives, to ceil((L + 1) / world) local fits (docs/evaluation.md, "The live probe during pretraining").

Layouts. ZeRO (any stage): each rank runs the whole model on its rows; every rank makes the same number of forward
passes, as ZeRO-3 gathers parameters collectively; the root module's own parameter (the SOS vector) is gathered
explicitly, since ZeRO-3 gathers a module's own parameters only inside its forward. Pipeline: each data-parallel
replica runs its rows through its stages one after another (activations sent stage to stage), every stage keeps the
features of the layers it holds, and each stage's data-parallel group fits those layers' probes. The accuracies
reach rank 0 in one gather.

Output (rank 0): TensorBoard `probe/val_acc/layer_XX`, `probe/best_val_acc`, `probe/best_layer`, `probe/seconds`, an
image `probe/acc_vs_layer`; `<run>/live_probe.json` (every probe so far, rewritten atomically); at the end
`<run>/live_probe.png` and the image `probe/acc_vs_val_loss`: best accuracy against validation loss over the run.

Cost per probe: (probe_images + probe_val_images) / dp images forward per rank, in batches of a step's per-rank
share (at most 8 micro-batches), one gather per layer and split, and ceil(len(layers) / dp) whole fits of
(probe_images x n_embd) on each owner. Memory per rank: its rows' features, (probe_images + probe_val_images) / dp x
len(layers) x n_embd x 4 B, plus on an owner its layers' whole rows, ceil(len(layers) / dp) x (probe_images +
probe_val_images) x n_embd x 4 B (3,072 images of iGPT-S, 25 layers of 512: 157 MB on 1 rank; at 64 ranks 2.5 MB of
own rows + one owned layer, 6.3 MB), plus the solver's state.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from igpt_ds.atomic import write_text
from igpt_ds.config import ConfigError, PretrainConfig
from igpt_ds.data.sampler import padded_batches, rank_rows
from igpt_ds.data.shards import ShardSplit
from igpt_ds.distributed.process_group import rank_and_world
from igpt_ds.distributed.rank0 import on_every_rank, on_rank0
from igpt_ds.eval import logreg
from igpt_ds.eval.features import eval_features
from igpt_ds.models.objectives import eval_bert_mask, eval_bert_masks
from igpt_ds.train.metrics import Metrics

C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
"""Inverse L2 strengths tried, ascending, each fit warm-started from the last; the best on validation is kept.
Stronger than the offline probe's grid: a few thousand images support less."""
MAX_ITER = 300
"""L-BFGS iterations per C (a live signal, not the final number: `launcher/linear_probe.py` gives that)."""


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """min(n, k) distinct indices spread evenly over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


@dataclass
class Subset:
    """The fixed images the live probe reads: split -> (indices, label class indices)."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    n_classes: int


def choose_subset(cfg: PretrainConfig, train: ShardSplit, val: ShardSplit) -> tuple[Subset | None, str]:
    """The subset, or None and why the live probe is off (no labels, one class, a validation class train lacks)."""
    t = cfg.train
    if not t.probe_every:
        return None, "train.probe_every=0"
    tr, va = evenly_spaced(len(train), t.probe_images), evenly_spaced(len(val), t.probe_val_images)
    y_tr, y_va = train.labels[tr], val.labels[va]
    if len(tr) == 0 or len(va) == 0 or (y_tr < 0).any() or (y_va < 0).any():
        return None, "the shards have no labels"
    classes = np.unique(y_tr)
    if len(classes) < 2 or np.setdiff1d(y_va, classes).size:
        return None, "the probe subset's train images hold fewer than 2 classes or miss a validation class"
    index = lambda y: np.searchsorted(classes, y).astype(np.int64)
    return Subset((tr, index(y_tr)), (va, index(y_va)), len(classes)), ""


class LiveProbe:
    """Built on every rank by pretraining's setup; `run_probe(step, val_loss)` is collective."""

    def __init__(
        self, engine: Any, cfg: PretrainConfig, splits: tuple[ShardSplit, ShardSplit], dp_rank: int, dp: int,
        metrics: Metrics, subset: Subset, start_step: int,
    ):  # fmt: skip
        """`engine`: the run's DeepSpeed engine (either layout); `splits`: (train, val) shards; `dp_rank` / `dp`: this
        rank's data-parallel coordinate and the data-parallel size; `metrics`: where rank 0 logs."""
        self.engine, self.model_cfg, self.splits, self.metrics, self.subset = engine, cfg.model, splits, metrics, subset
        self.dp_rank, self.dp, self.pipeline = dp_rank, dp, cfg.train.layout == "pipeline"
        self.n_layer = cfg.model.n_layer
        self.layers = sorted(set(cfg.train.probe_layers)) or list(range(self.n_layer + 1))
        if any(not 0 <= l <= self.n_layer for l in self.layers):
            raise ConfigError(f"train.probe_layers={cfg.train.probe_layers} must lie in 0..{self.n_layer}")
        self.path = cfg.train.run_dir / "live_probe.json"
        self.plot = cfg.train.run_dir / "live_probe.png"
        self.rank = rank_and_world()[0]
        t = cfg.train
        self.batch_size = min(t.global_batch // dp, 8 * t.micro_batch)
        """Images per forward pass: a training step's per-rank share (micro-batch x accumulation), at most 8
        micro-batches; without gradients a forward holds one layer's activations at a time, not every layer's,
        and under ZeRO-3 each pass gathers every parameter once, so larger batches cost fewer gathers."""
        self.seconds = 0.0
        """Wall time this process spent in probes."""
        self.history, self.before = on_rank0(lambda: self.read_history(start_step))
        """Probes of this run up to the step it resumes from, and the probe and wall seconds of its earlier
        processes (the overhead is the run's, over every process that trained it)."""

    def read_history(self, start_step: int) -> tuple[list[dict], dict[str, float]]:
        """Earlier probes of this run up to the step it resumes from (a rerun from step s redoes the later ones)."""
        if not self.path.is_file() or start_step == 0:
            return [], {"probe_s": 0.0, "wall_s": 0.0}
        saved = json.loads(self.path.read_text())
        before = saved.get("overhead", {"probe_s": 0.0, "wall_s": 0.0})
        return [h for h in saved["history"] if h["step"] <= start_step], before

    @property
    def chance(self) -> float:
        return 100.0 / self.subset.n_classes

    def run_probe(self, step: int, val_loss: float) -> dict[str, Any]:
        """Extract, fit and log one probe (every rank); returns {'acc': {layer: %}, 'best_layer', ...}."""
        tic = time.perf_counter()
        engine = self.engine
        engine.eval()
        with torch.no_grad():
            feats = {k: self.features(split, *getattr(self.subset, k))
                     for k, split in zip(("train", "val"), self.splits, strict=True)}  # fmt: skip
        engine.train()
        extract_s = time.perf_counter() - tic
        group = engine.grid.get_data_parallel_group() if self.pipeline else None
        owned = self.gather_to_owners(feats, group)
        acc: dict[int, float] = {}
        for part in on_every_rank(lambda: self.fit_owned(owned), poll_s=0.1):
            acc.update(part)
        best = max(acc, key=lambda l: acc[l])
        seconds = time.perf_counter() - tic
        self.seconds += seconds
        entry = {"step": step, "val_loss": val_loss, "acc": {str(l): acc[l] for l in sorted(acc)},
                 "best_layer": best, "best_acc": acc[best], "seconds": seconds, "extract_s": extract_s}  # fmt: skip
        if self.rank == 0:
            self.history.append(entry)
            self.log(entry, {l: acc[l] for l in sorted(acc)})
        return entry

    def log(self, entry: dict, acc: dict[int, float]) -> None:
        from igpt_ds.eval.plots import live_probe_layers

        writer, step = self.metrics.writer, entry["step"]
        for l, a in acc.items():
            writer.add_scalar(f"probe/val_acc/layer_{l:02d}", a, step)
        for tag, value in (("best_val_acc", entry["best_acc"]), ("best_layer", entry["best_layer"]),
                           ("seconds", entry["seconds"])):  # fmt: skip
            writer.add_scalar(f"probe/{tag}", value, step)
        writer.add_figure("probe/acc_vs_layer", live_probe_layers(acc, self.chance, self.n_layer, step), step)
        writer.flush()
        self.save()
        self.metrics.print(
            f"step {step} live probe: best layer {entry['best_layer']} {entry['best_acc']:.1f}% on validation "
            f"(chance {self.chance:.1f}%; layers "
            + " ".join(f"{l}:{a:.0f}" for l, a in acc.items())
            + f") in {entry['seconds']:.1f} s"
        )

    def save(self, wall_s: float | None = None) -> None:
        s = self.subset
        out = {"train_images": len(s.train[0]), "val_images": len(s.val[0]), "classes": s.n_classes,
               "chance": self.chance, "layers": self.layers, "c_grid": list(C_GRID),
               "history": self.history}  # fmt: skip
        if wall_s:
            probe_s, wall_s = self.before["probe_s"] + self.seconds, self.before["wall_s"] + wall_s
            out["overhead"] = {"probe_s": probe_s, "wall_s": wall_s, "share": probe_s / wall_s}
        elif self.before["wall_s"]:  # mid-run: the earlier processes' figure until this one's end adds to it
            out["overhead"] = self.before
        write_text(self.path, json.dumps(out, indent=2) + "\n")

    def finish(self, step: int, wall_s: float) -> None:
        """Rank 0: the history plot (file and TensorBoard) and this process's probe share of the wall time."""
        if self.rank != 0 or not self.history:
            return
        from igpt_ds.eval.plots import live_probe_history

        self.save(wall_s)
        fig = live_probe_history(self.history, self.chance, self.plot)
        self.metrics.writer.add_figure("probe/acc_vs_val_loss", fig, step)
        self.metrics.print(
            f"live probe: {self.seconds:.1f} s of {wall_s:.1f} s ({self.seconds / wall_s:.1%} of this process's "
            f"wall time); {self.path}, {self.path.with_suffix('.png')}"
        )

    # Extraction ---------------------------------------------------------------------------------------------

    def rows(self, n: int) -> range:
        """This data-parallel rank's rows of an n-image subset (whole blocks: the fit is world-size free)."""
        return rank_rows(n, self.dp_rank, self.dp, logreg.BLOCK_ROWS)

    def features(self, split: ShardSplit, indices: np.ndarray, labels: np.ndarray) -> tuple[dict, Tensor, int]:
        """({layer: this rank's rows' features (n_local, C), fp32 on the engine's device} for the layers this
        rank computes, their class indices (n_local,), the subset's size)."""
        device = self.engine.device
        out: dict[int, list[Tensor]] = {l: [] for l in self.local_layers()}
        for rows in padded_batches(len(indices), self.dp_rank, self.dp, self.batch_size, logreg.BLOCK_ROWS):
            idx = indices[rows] if len(rows) else indices[:1]  # a rank out of rows still takes part
            tokens = torch.from_numpy(split.batch(idx)[0]).to(device)
            got = self.pipe_features(tokens, idx) if self.pipeline else self.zero_features(tokens, idx)
            for l, f in got.items():
                out[l].append(f[: len(rows)].float())
        mine = self.rows(len(indices))
        feats = {l: torch.cat(v) for l, v in out.items()}
        return feats, torch.from_numpy(labels[mine.start : mine.stop]).to(device), len(indices)

    def zero_features(self, tokens: Tensor, idx: np.ndarray) -> dict[int, Tensor]:
        module = self.engine.module
        # ZeRO-3 gathers a module's own parameters in that module's forward; features() is not IGPT's forward,
        # so the SOS vector is gathered here (a no-op for parameters ZeRO does not partition).
        with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False))):
            masks = [m.to(tokens.device) for m in eval_bert_masks(module.cfg, idx, 1)]
            return eval_features(module, tokens, self.layers, masks)

    def local_layers(self) -> list[int]:
        """Probe layers whose features this rank computes."""
        if not self.pipeline:
            return self.layers
        held = {i for i, _ in self.engine.module.local_layers()}
        # Layer l < n_layer is read at block l (pipeline layer l + 1); the final norm at the head (n_layer + 1).
        return [l for l in self.layers if l + 1 in held]

    def pipe_features(self, tokens: Tensor, idx: np.ndarray) -> dict[int, Tensor]:
        """This stage's layers' pooled features of a batch that runs through the replica's stages in turn."""
        engine, cfg = self.engine, self.model_cfg
        module, wanted = engine.module, set(self.layers)
        x = None
        if not engine.is_first_stage():
            dtype = next(module.parameters()).dtype
            x = torch.empty(len(tokens), cfg.seq_len, cfg.n_embd, dtype=dtype, device=tokens.device)
            dist.recv(x, engine.grid.stage_to_global(engine.prev_stage))
        out: dict[int, Tensor] = {}
        for i, layer in module.local_layers():
            if i == 0:  # the embedding; a BERT mask travels as the out-of-vocabulary id (igpt_ds.models.pipe)
                if cfg.objective == "bert":
                    tokens = tokens.masked_fill(eval_bert_mask(cfg, idx).to(tokens.device), cfg.n_vocab)
                x = layer(tokens)
            elif i <= cfg.n_layer:
                if i - 1 in wanted:
                    out[i - 1] = layer.ln_1(x).mean(dim=1)
                x = layer(x)
            elif cfg.n_layer in wanted:
                out[cfg.n_layer] = layer.ln_f(x).mean(dim=1)
        if not engine.is_last_stage():
            dist.send(x.contiguous(), engine.grid.stage_to_global(engine.next_stage))
        return out

    # Fitting ------------------------------------------------------------------------------------------------

    def gather_to_owners(self, feats: dict[str, tuple[dict[int, Tensor], Tensor, int]], group: Any
                         ) -> dict[int, tuple[Tensor, Tensor]]:  # fmt: skip
        """{layer: (train rows, val rows)} of the layers this rank owns, every row of the subset in order: layer i of
        `local_layers()` goes to the (i mod size)-th rank of `group` (None: all ranks). One gather per layer and
        split, of the ranks' rows padded to the largest share. Collective over `group`."""
        members = dist.get_process_group_ranks(group) if group is not None else list(range(rank_and_world()[1]))
        owned = {}
        for i, layer in enumerate(self.local_layers()):
            owner = members[i % len(members)]
            rows = [self.gather_rows(feats[k][0][layer], feats[k][2], owner, group) for k in ("train", "val")]
            if self.rank == owner:
                owned[layer] = (rows[0], rows[1])
        return owned

    def gather_rows(self, x: Tensor, n: int, owner: int, group: Any) -> Tensor | None:
        """The subset's n rows of one layer on `owner` (None elsewhere), from each rank's `rows(n)` share."""
        if self.dp == 1:
            return x
        counts = [len(rank_rows(n, r, self.dp, logreg.BLOCK_ROWS)) for r in range(self.dp)]
        padded = x.new_zeros(max(counts), x.shape[1])
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts] if self.rank == owner else None
        dist.gather(padded, parts, dst=owner, group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]) if parts is not None else None

    def fit_owned(self, owned: dict[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
        """{layer: validation accuracy (%)} of this rank's layers, fitted here alone (`fit`); runs in
        `on_every_rank`'s worker thread, on this rank's device."""
        device = self.engine.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return {layer: self.fit(x_tr, x_va) for layer, (x_tr, x_va) in owned.items()}

    def fit(self, x_tr: Tensor, x_va: Tensor) -> float:
        """Validation accuracy (%) of the best-C probe on one layer's whole subset: train rows `x_tr`, validation
        rows `x_va` (on the engine's device; solved in float32, `logreg.solver_dtype`). No collective
        (`logreg.LOCAL`)."""
        local = logreg.LOCAL
        y_tr, y_va = (torch.from_numpy(y).to(x_tr.device) for y in (self.subset.train[1], self.subset.val[1]))
        n_tr, n_va = len(x_tr), len(x_va)
        scaler = logreg.Scaler.fit(x_tr, n_tr, local)
        scaler.apply_(x_tr)
        scaler.apply_(x_va)
        basis = logreg.Basis.fit(x_tr, n_tr, local)
        fit_at = lambda C, warm: logreg.fit(x_tr, y_tr, self.subset.n_classes, n_tr, C, MAX_ITER, warm, group=local,
                                            basis=basis)  # fmt: skip
        validate = lambda model: 100.0 * logreg.correct(x_va, y_va, model, local) / n_va
        return logreg.sweep_c(fit_at, C_GRID, validate)[2]
