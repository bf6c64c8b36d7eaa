"""Data-parallel multinomial L2 logistic regression: the linear probe's solver (docs/reference.md#evaluation).

Each rank holds a disjoint range of the rows (`igpt_ds.data.sampler.rank_rows` in blocks of BLOCK_ROWS: its share of
the train, val and test features);
no rank ever holds all of them. The objective is scikit-learn's `LogisticRegression(C)` divided by C·N, so
it has the same minimiser for the same C:

    J(W, b) = (1/N) Σ_i CE(x_i W + b, y_i) + ||W||² / (2·C·N)      (bias unregularised)

with N the train rows of all ranks together. Standardisation statistics (mean, population std per
feature) come from the train rows alone (two passes: mean, then squared deviations about it) and are
applied to every split.

Solver: full-batch L-BFGS (torch.optim.LBFGS, strong-Wolfe line search) whose closure sums the ranks'
local loss and gradient in one all-reduce of d·K + K + 1 numbers. Why this one: it minimises exactly the
objective scikit-learn does (so accuracies agree, and C keeps its meaning), it has no learning rate to
tune, and full-batch passes are what data parallelism makes cheap (one all-reduce per pass). SGD would need a
step-size schedule per layer and C; Newton's method a (dK)² Hessian.

Preconditioning (`Basis`). A network's features are correlated: standardised, their train covariance Σ still has
eigenvalues from ~50 down to 1e-5 (the views study's layer 0: 45 to 7e-6; the mnist5k-size set's layer 4: 24 to
2e-3), and at large C nothing but the data bounds the small directions, so J's Hessian is as ill-conditioned as Σ.
Plain L-BFGS then needed 628 passes at C = 10 and stopped unconverged at max_iter = 1000 (1,054 passes) at C = 100
on layer 0 (3,500 x 64 real features, 1.6 ms a pass: 3.1 s of that layer's 4.3 s sweep went to C >= 1), where the
synthetic benchmark's features (condition 100) took tens: the time is the number of passes, not the pass. So `fit`
solves for V in W = Q·diag(s)·V, b = s_b·c, with Σ = Q·diag(λ)·Qᵀ computed once per probe (an exact fixed-point d x
d sum, eigendecomposed in float64 on one core, broadcast from the group's first rank) and s_i = (CURVATURE·λ_i +
1/(C·N))^-½: the inverse square root of J's curvature along each eigenvector if the softmax's curvature were
CURVATURE per unit of variance. The objective is unchanged — the same minimiser, any positive CURVATURE — only the
coordinates L-BFGS steps in are: layer 0 at C = 100 converges in 43 passes, not 1,054+, and a whole 9-layer sweep
takes 26.4 -> 9.4 s on 3,500 x 64 real features and 483 -> 110 s on 56,000 x 64 (layer 0: 221 -> 2.6 s;
bench/results/probe_speed_real_*.md, docs/evaluation.md), with the same accuracies where the old fits had converged
(0.1 points at most, one test image; where they had stopped at max_iter, up to 0.7 points: the old fit's error). Not
needed once preconditioned: a looser gradient tolerance or a cap on passes per warm-started C (both trade the
minimiser for time, and the tolerance 1e-6 is now reached in tens of passes); warm starts across layers (each
layer's first C costs 12-15 passes). Newton's method would form a (dK)² Hessian at N·d²·K² per step. Features wider
than PRECONDITION_MAX_D go unpreconditioned.

World-size-independent sums. Rows are grouped in blocks of `BLOCK_ROWS` counted from the split's first
row, and ranks hold whole blocks. Every sum over rows (statistics, loss, gradient) is taken per block in
floating point, rounded to a fixed-point integer on a grid set by a bound that every rank knows, and the
integers are added — exactly, so in any order: the result does not depend on how blocks fall to ranks.
One rank and 1024 ranks fit the same probe bit for bit, and every rank receives the same loss and
gradient by construction, so every rank's L-BFGS takes the same steps and calls the same collectives.
The grid is 2^-62 of the largest possible total (about 1e-13 of the bound relative): far below the
solver's tolerance.

Memory per rank: its rows in fp32, about (N_train + N_val + N_test) / world × d × 4 B (whole blocks:
at most one block more), plus one block's temporaries and the solver's state, replicated on every rank:
W, its gradients and L-BFGS's history of `HISTORY` pairs, `SOLVER_COPIES`·(d·K + K) values of the
compute dtype (float32), plus one run of blocks' temporaries (`runs_of_blocks`), and the basis: Q (d² values of the
compute dtype) kept, about 4·d² float64/int64 values while it is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

HISTORY = 20
"""L-BFGS correction pairs kept."""
SOLVER_COPIES = 84
"""Vectors of W's size (d·K + K) a rank holds at its peak RSS while fitting: L-BFGS's 2·HISTORY history
vectors, its direction, gradients and line-search copies, the closure's fixed-point accumulator, scales and
partials, and what the allocator keeps of freed ones. Measured, not counted: bench/probe_scale.py at 1000
classes (50k x 512, 100 iterations) needs 83-84 on the CPU, on 1 rank and on 2 (the state is replicated)."""
LOCAL = "local"
"""The group of a fit whose rows all sit on this rank: every sum stays local, no collective runs (the live probe
gathers each layer's rows to one rank and fits there)."""
Group = dist.ProcessGroup | str | None
"""The ranks that hold the rows (None: all of them; LOCAL: this rank alone)."""
BLOCK_ROWS = 256
"""Rows per block: the unit of exact summation and of the split of rows over ranks."""


def blocks(n_local: int) -> list[slice]:
    return [slice(a, min(n_local, a + BLOCK_ROWS)) for a in range(0, n_local, BLOCK_ROWS)]


RUN_VALUES = 1 << 22
"""Per-block partial values held at once while fitting (a float32 copy, and float64 and int64 ones while rounding:
80 MB): a run of blocks has at most
RUN_VALUES / (d·K) of them, so several small blocks share one batched product (fewer, larger operations) and
ImageNet-sized problems (d·K = 1.5M) still go a block at a time."""
MAX_RUN_BLOCKS = 64


def runs_of_blocks(n_local: int, width: int) -> list[slice]:
    """Consecutive runs of whole blocks covering range(n_local), each at most RUN_VALUES / width blocks."""
    step = BLOCK_ROWS * max(1, min(MAX_RUN_BLOCKS, RUN_VALUES // max(1, width)))
    return [slice(a, min(n_local, a + step)) for a in range(0, n_local, step)]


def as_blocks(t: Tensor, fill: float = 0.0) -> Tensor:
    """Rows of `t` (m, ...) as (ceil(m / BLOCK_ROWS), BLOCK_ROWS, ...), the last block padded with `fill`."""
    pad = -len(t) % BLOCK_ROWS
    if pad:
        t = torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])
    return t.view(-1, BLOCK_ROWS, *t.shape[1:])


def world(group: Group = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not LOCAL else 1


def all_reduce(t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group: Group = None) -> Tensor:
    """In place over the ranks of `group` (default: all; a no-op without a process group)."""
    if world(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class FixedPointSum:
    """Sums of per-block float partials, exact and order-free: each partial is rounded to a multiple of
    1/scale and accumulated as int64; `bounds` (one per segment of the flat vector) bound any block's partial
    in absolute value, so `n_blocks` of them stay below 2^62. Every rank must pass the same bounds."""

    def __init__(self, sizes: list[int], bounds: list[float], n_blocks: int, device: torch.device):
        scales = [2.0 ** math.floor(62 - math.log2(max(b, 1e-300) * max(n_blocks, 1))) for b in bounds]
        full = lambda size, scale: torch.full((size,), scale, dtype=torch.float64, device=device)
        self.scale = torch.cat([full(s, f) for s, f in zip(sizes, scales, strict=True)])
        self.acc = torch.zeros(sum(sizes), dtype=torch.int64, device=device)

    def add(self, partial: Tensor) -> None:
        """Add one block's flat partial (any float dtype)."""
        self.acc += (partial.double() * self.scale).round_().long()

    def add_rows(self, partials: Tensor) -> None:
        """Add several blocks' flat partials, one block per row (n_blocks, size): each rounded on its own."""
        self.acc += (partials.double() * self.scale).round_().long().sum(0)

    def total(self, group: Group = None) -> Tensor:
        """The sum over every rank's blocks, float64, identical on every rank (collective)."""
        return all_reduce(self.acc, group=group).double() / self.scale


def max_over_ranks(x: Tensor, row_value: Callable[[Tensor], Tensor], group: Group = None) -> float:
    """The largest `row_value(block)` over every rank's rows, block by block (no full-size temporary);
    collective."""
    local = max((float(row_value(x[c]).max()) for c in blocks(len(x))), default=0.0)
    out = torch.tensor([local], dtype=torch.float64, device=x.device)
    return float(all_reduce(out, dist.ReduceOp.MAX, group).item())


def max_abs(x: Tensor, group: Group = None) -> float:
    """max |x| over every rank's rows (collective)."""
    return max_over_ranks(x, torch.abs, group)


def solver_dtype(device: torch.device) -> torch.dtype:
    """float32 on every device. On the CPU float64 (scikit-learn's precision) reaches the same accuracy (to 0.02
    points on 54k x 128 features, bench/results/probe_speed.md) 1.7x slower: the sums that must be exact are
    the fixed-point ones, whatever the dtype of the partials."""
    return torch.float32


@dataclass
class Scaler:
    """Per-feature standardisation from the train rows of all ranks: (x - mean) / std."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, n_global: int, group: Group = None) -> Scaler:
        """Mean and population std of every rank's rows of `x` (n_local, d), `n_global` rows in all; collective.
        A constant feature (std < 1e-8, e.g. an always-white corner pixel) keeps scale 1 and becomes 0."""
        d, n_blocks, bound = x.shape[1], math.ceil(n_global / BLOCK_ROWS), max_abs(x, group)
        total = FixedPointSum([d], [BLOCK_ROWS * bound], n_blocks, x.device)
        for c in blocks(len(x)):
            total.add(x[c].double().sum(0))
        mean = total.total(group) / max(1, n_global)
        squares = FixedPointSum([d], [BLOCK_ROWS * (2 * bound) ** 2], n_blocks, x.device)
        for c in blocks(len(x)):
            squares.add(((x[c].double() - mean) ** 2).sum(0))
        std = (squares.total(group) / max(1, n_global)).sqrt()
        std[std < 1e-8] = 1.0
        return cls(mean, std)

    def apply_(self, x: Tensor) -> Tensor:
        """Standardise float32 `x` in place, block by block (no full-size temporary)."""
        for c in blocks(len(x)):
            x[c] = ((x[c].double() - self.mean) / self.std).to(x.dtype)
        return x


PRECONDITION_MAX_D = 4096
"""Widest features `Basis.fit` preconditions (a d x d float64 covariance and its eigendecomposition on one core, on
every rank: 134 MB at 4096); wider ones (concatenations of big models' layers) are fitted unpreconditioned."""
CURVATURE = 0.1
"""The data term's curvature per unit of feature variance the preconditioner assumes: the softmax's p(1 - p) averaged
over rows and classes, 1/K at the start of a fit, smaller as it sharpens (measured best of 0.03-1 on the real
features of bench/results/probe_speed_real*.md; any positive value gives the same minimiser)."""


@dataclass
class Basis:
    """The eigenbasis of the standardised train features' covariance, Σ = Q·diag(eig)·Qᵀ: `fit` solves in the
    coordinates W = Q·diag(s)·V, s_i = (CURVATURE·eig_i + 1/(C·N))^(-1/2), where the objective's Hessian is
    close to the identity (real features' eig span 1e-6 to 50: raw L-BFGS needs thousands of passes at large C).
    Identical on every rank: the covariance is an exact fixed-point sum and its eigendecomposition is computed in
    float64 on the CPU with one thread."""

    Q: Tensor
    """(d, d) eigenvectors, compute dtype, on the rows' device."""
    eig: Tensor
    """(d,) eigenvalues, float64 on the CPU, clamped at 0."""

    @classmethod
    def fit(cls, x: Tensor, n_global: int, group: Group = None) -> Basis | None:
        """The basis of standardised `x` (n_local, d) over every rank's rows (collective); None (no
        preconditioning) where d > PRECONDITION_MAX_D."""
        d, n_blocks = x.shape[1], math.ceil(n_global / BLOCK_ROWS)
        if d > PRECONDITION_MAX_D:
            return None
        bound = max_abs(x, group)
        cov = FixedPointSum([d * d], [BLOCK_ROWS * bound**2], n_blocks, x.device)
        for c in blocks(len(x)):
            xc = x[c].double()
            cov.add((xc.T @ xc).flatten())
        cov = (cov.total(group) / max(1, n_global)).view(d, d).cpu()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # LAPACK's result may depend on its thread count: the same at any world size
        try:
            eig, Q = torch.linalg.eigh(cov)
        finally:
            torch.set_num_threads(threads)
        both = torch.cat([eig[None], Q]).to(x.device)  # (1 + d, d)
        if world(group) > 1:  # the group's first rank's, so every rank surely takes the same steps
            dist.broadcast(both, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
        return cls(both[1:].to(solver_dtype(x.device)), both[0].cpu().clamp(min=0.0))

    def scales(self, C: float, n_global: int, device: torch.device) -> tuple[Tensor, float]:
        """(s (d,), s_b): the scale of each eigen-direction of W at this C, and of the (unregularised) bias."""
        s = (CURVATURE * self.eig + 1.0 / (C * n_global)).rsqrt()
        return s.to(solver_dtype(device)).to(device), CURVATURE**-0.5


@dataclass
class Fit:
    W: Tensor
    """(d, K) weights, compute dtype."""
    b: Tensor
    """(K,) biases."""
    converged: bool
    """False if L-BFGS stopped at max_iter."""
    n_iter: int
    n_evals: int = 0
    """Loss and gradient passes over the rows (L-BFGS's iterations plus its line searches' extra evaluations)."""


def fit(
    x: Tensor,
    target: Tensor,
    n_classes: int,
    n_global: int,
    C: float,
    max_iter: int = 1000,
    warm: Fit | None = None,
    tol: float = 1e-6,
    group: Group = None,
    basis: Basis | None = None,
) -> Fit:
    """Minimise J over every rank's rows; collective (every rank calls it with its rows).

    `x` (n_local, d) standardised features (fp32, on the compute device) starting at a block boundary;
    `target` (n_local,) class indices in [0, n_classes); `n_global` train rows over all ranks; `warm` starts
    from a previous solution (the previous C of an ascending sweep); `basis` (`Basis.fit` of the same train rows,
    once per probe) preconditions: L-BFGS then works on V, W = Q·diag(s)·V, b = s_b·c, and `tol` bounds that
    gradient. Returns the same Fit on every rank."""
    device, dtype = x.device, solver_dtype(x.device)
    d, K = x.shape[1], n_classes
    W0 = warm.W.clone() if warm is not None else torch.zeros(d, K, dtype=dtype, device=device)
    b0 = warm.b.clone() if warm is not None else torch.zeros(K, dtype=dtype, device=device)
    if basis is not None:
        s, s_b = basis.scales(C, n_global, device)
        Q = basis.Q
        to_W = lambda V, c: (Q @ (s[:, None] * V), s_b * c)
        V, c = (Q.T @ W0) / s[:, None], b0 / s_b
    else:
        to_W = lambda V, c: (V, c)
        V, c = W0, b0
    x_abs = max_abs(x, group)
    row_l1 = max_over_ranks(x, lambda block: block.abs().sum(1), group)
    n_blocks = math.ceil(n_global / BLOCK_ROWS)
    opt = torch.optim.LBFGS([V, c], lr=1, max_iter=max_iter, history_size=HISTORY, tolerance_grad=tol,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")  # fmt: skip

    @torch.no_grad()
    def closure() -> Tensor:
        W, b = to_W(V, c)
        # Bounds on one block's partials: |CE| <= 2·max|z| + ln K, |∂/∂W| <= Σ|x|, |∂/∂b| <= rows.
        z_max = row_l1 * float(W.abs().max()) + float(b.abs().max())
        sums = FixedPointSum([1, d * K, K], [BLOCK_ROWS * (2 * z_max + math.log(K)), BLOCK_ROWS * x_abs, BLOCK_ROWS],
                             n_blocks, device)  # fmt: skip
        for r in runs_of_blocks(len(x), d * K):
            # A run of whole blocks at once, each block's partials apart: (nb, BLOCK_ROWS, ·) batched products
            # compute every block as its own 256-row problem, whichever run or rank it falls in.
            xb, tb = as_blocks(x[r].to(dtype)), as_blocks(target[r], fill=0)  # (nb, 256, d), (nb, 256)
            real = as_blocks(torch.ones(r.stop - r.start, dtype=dtype, device=device))  # 0 on padding rows
            z = torch.baddbmm(b.expand(len(xb), 1, K), xb, W.expand(len(xb), d, K))  # (nb, 256, K)
            lse = torch.logsumexp(z, dim=2)
            loss = ((lse - z.gather(2, tb[..., None]).squeeze(2)) * real).sum(1)  # (nb,)
            p = torch.exp(z - lse[..., None])  # softmax
            p.scatter_add_(2, tb[..., None], -torch.ones_like(p[..., :1]))  # ∂CE/∂z = softmax - onehot
            p *= real[..., None]
            sums.add_rows(torch.cat([loss[:, None], torch.bmm(xb.transpose(1, 2), p).flatten(1), p.sum(1)], 1))
        total = (sums.total(group) / n_global).to(dtype)
        grad_W = total[1 : 1 + d * K].view(d, K) + W / (C * n_global)
        grad_b = total[1 + d * K :].clone()
        if basis is not None:  # the chain rule through W = Q·diag(s)·V, b = s_b·c
            grad_W, grad_b = s[:, None] * (Q.T @ grad_W), s_b * grad_b
        V.grad, c.grad = grad_W, grad_b
        return total[0] + (W * W).sum() / (2 * C * n_global)

    opt.step(closure)
    state = opt.state[opt._params[0]]
    W, b = to_W(V.detach(), c.detach())
    return Fit(W, b, state["n_iter"] < max_iter, state["n_iter"], state["func_evals"])


def correct(x: Tensor, target: Tensor, model: Fit, group: Group = None) -> int:
    """How many rows of every rank's `x` the model classifies right (an all-reduced count; collective)."""
    hits = torch.zeros(1, dtype=torch.int64, device=x.device)
    for c in blocks(len(x)):
        logits = x[c].to(model.W.dtype) @ model.W + model.b
        hits += (logits.argmax(dim=1) == target[c]).sum()
    return int(all_reduce(hits, group=group).item())


def fit_sklearn(x: Tensor, target: Tensor, n_classes: int, C: float, max_iter: int = 1000) -> Fit:
    """The reference: scikit-learn's L-BFGS on the same rows (one rank holding all of them; a float64 copy).
    Same objective as `fit`; used in tests and by `--solver sklearn` on one rank."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x.cpu().numpy(), target.cpu().numpy())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    W = np.zeros((x.shape[1], n_classes))
    b = np.zeros(n_classes)
    if len(clf.classes_) == 2:  # scikit-learn fits one binary model: logit of class 1 against class 0
        W[:, clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        W[:, clf.classes_], b[clf.classes_] = clf.coef_.T, clf.intercept_
    to = lambda a: torch.as_tensor(a, dtype=solver_dtype(x.device), device=x.device)
    return Fit(to(W), to(b), converged, int(np.max(clf.n_iter_)))


def sweep_c(
    fit_at: Callable[[float, Fit | None], Fit],
    c_grid: Sequence[float],
    validate: Callable[[Fit], float],
    patience: int = 0,
) -> tuple[Fit, float, float]:
    """The C sweep of a probe: `fit_at(C, warm)` for each C of `c_grid`, ascending, each warm-started from the last
    fit; the fit with the best `validate(fit)` (validation accuracy) is kept, ties to the stronger L2. With
    `patience`, stop after that many C in a row without a better one. Returns (fit, C, its validation accuracy).
    Collective when the fits and `validate` are (the same accuracies, hence the same stop, on every rank)."""
    best: tuple[Fit, float, float] | None = None
    warm, worse = None, 0
    for C in sorted(c_grid):
        if patience and worse >= patience:
            break
        warm = fit_at(C, warm)
        accuracy = validate(warm)
        if best is None or accuracy > best[2]:
            best, worse = (warm, C, accuracy), 0
        else:
            worse += 1
    assert best is not None, "c_grid is empty"
    return best
