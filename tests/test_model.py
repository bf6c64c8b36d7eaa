"""The iGPT model: causality, initial loss, preset sizes, BERT masking, KV cache, features."""

import math

import numpy as np
import pytest
import torch

from igpt_ds.config import ModelConfig
from igpt_ds.models.igpt import IGPT, count_parameters
from igpt_ds.models.kv_cache import KVCache
from igpt_ds.models.objectives import bert_mask, mask_from_uniform, objective_loss

TINY = dict(size="igpt-tiny", n_px=8, n_vocab=512)


def tiny(objective: str = "ar", seed: int = 0, trained: bool = True) -> IGPT:
    torch.manual_seed(seed)
    model = IGPT(ModelConfig(**TINY, objective=objective))
    if trained:  # the zero-initialised head would hide every dependency of the logits on the input
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.eval()


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (batch, 64), generator=torch.Generator().manual_seed(seed))


def test_ar_is_causal():
    model, x = tiny(), tokens()
    t = 20
    changed = x.clone()
    changed[:, t] = (x[:, t] + 1) % 512
    a, b = model(x), model(changed)
    # Pixel t is an input only from position t+1 on (the input is shifted right by SOS).
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-4


def test_bert_is_bidirectional():
    model, x = tiny("bert"), tokens()
    changed = x.clone()
    changed[:, 40] = (x[:, 40] + 1) % 512
    assert (model(x)[:, :40] - model(changed)[:, :40]).abs().amax() > 1e-4


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_loss_at_init_is_ln_vocab(objective):
    model, x = tiny(objective, trained=False), tokens()
    mask = bert_mask(x.shape, 0.15) if objective == "bert" else None
    assert model.loss(x, mask).item() == pytest.approx(math.log(512), abs=1e-5)  # zero head: uniform logits


@pytest.mark.parametrize(
    "size,n_px,expected", [("igpt-s", 32, 76e6), ("igpt-m", 32, 455e6), ("igpt-l", 32, 1.4e9), ("igpt-xl", 64, 6.8e9)]
)
def test_preset_parameter_counts(size, n_px, expected):
    # The paper quotes rounded figures (iGPT-L: 1.36B -> "1.4B").
    assert count_parameters(ModelConfig(size=size, n_px=n_px)) == pytest.approx(expected, rel=0.03)


def test_bert_masks_are_a_bernoulli_draw_per_position_or_an_exact_count():
    """The paper's and OpenAI's mask: every position masked independently with probability 0.15 (their keep-mask is
    uniform > 0.15); model.bert_mask=exact masks exactly round(0.15·T) per image instead."""
    gen = torch.Generator().manual_seed(0)
    mask = bert_mask((20000, 64), 0.15, gen)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.15) < 0.003  # std of the rate: sqrt(.15·.85 / 1.28M) = 0.0003
    rate = mask.float().mean(dim=0)  # every position alike
    assert rate.min() > 0.13 and rate.max() < 0.17
    # A per-image count is Binomial(64, 0.15): mean 9.6, variance 8.16 (an exact count has variance 0) ...
    counts = mask.sum(dim=1).float()
    assert abs(counts.mean().item() - 9.6) < 0.1 and 7.5 < counts.var().item() < 8.9
    # ... and positions are independent: neighbours' indicators are uncorrelated.
    a, b = mask[:, :-1].float().flatten(), mask[:, 1:].float().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01
    exact = bert_mask((2000, 64), 0.15, gen, kind="exact")
    assert (exact.sum(dim=1) == round(0.15 * 64)).all() and not torch.equal(exact[0], exact[1])
    rate = exact.float().mean(dim=0)
    assert rate.min() > 0.1 and rate.max() < 0.2  # uniform over positions


def test_bert_loss_is_the_mean_over_images_of_each_images_mean_over_its_masked_positions():
    """OpenAI's gen loss for BERT: reduce_sum(ce·(1-M), 1) / reduce_sum(1-M, 1), then the mean over the batch."""
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 16, 8), torch.randint(0, 8, (4, 16))
    u = torch.rand(4, 16)
    u[0, :12] = 0.0  # image 0 has many masked positions, the others few: per-token and per-image means differ
    keep = (u > 0.15).float()  # the official keep-mask M
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (4, 16)
    official = ((ce * (1 - keep)).sum(1) / (1 - keep).sum(1)).mean()
    mask = mask_from_uniform(u, 0.15)
    torch.testing.assert_close(objective_loss(logits, targets, mask), official)
    assert abs(ce[mask].mean() - official) > 1e-3  # the per-token mean is another number
    # An image with nothing masked is left out (the official code would divide by zero); none at all: 0.
    mask[1] = False
    kept = [0, 2, 3]
    by_hand = torch.stack([ce[i][mask[i]].mean() for i in kept]).mean()
    torch.testing.assert_close(objective_loss(logits, targets, mask), by_hand)
    assert objective_loss(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_bert_mask_semantics():
    mask = bert_mask((4, 64), 0.15, torch.Generator().manual_seed(0))

    model, x = tiny("bert"), tokens()
    # A masked pixel's value is invisible to the model: its token embedding is zeroed, position kept.
    other = x.clone()
    other[mask[:3]] = (x[mask[:3]] + 7) % 512
    torch.testing.assert_close(model(x, mask[:3]), model(other, mask[:3]), rtol=0, atol=0)
    emb = model.embed(x, mask[:3])
    torch.testing.assert_close(emb[mask[:3]], model.wpe.weight[:64].expand(3, -1, -1)[mask[:3]])
    # The loss counts masked positions only: the mean of -log softmax at the masked pixels, by hand.
    logits = model(x, mask[:3])
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    nll = -log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    by_hand = torch.stack([nll[i][mask[i]].mean() for i in range(3)]).mean()
    torch.testing.assert_close(objective_loss(logits, x, mask[:3]), by_hand)
    unmasked_changed = logits.clone()
    unmasked_changed[~mask[:3]] += torch.randn_like(unmasked_changed[~mask[:3]])
    assert objective_loss(unmasked_changed, x, mask[:3]) == objective_loss(logits, x, mask[:3])


def test_kv_cache_step_equals_full_forward():
    model, x = tiny(), tokens(batch=2)
    full = model(x)
    cache = KVCache(model.cfg, 2, torch.device("cpu"), torch.float32)
    first = model.step(x[:, :0], cache)  # SOS alone -> pixel 0
    after_prefix = model.step(x[:, :10], cache)  # a prefix in one call -> pixel 10
    rest = [model.step(x[:, t : t + 1], cache) for t in range(10, 63)]  # one pixel a call -> 11..63
    torch.testing.assert_close(first, full[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([after_prefix, *rest], 1), full[:, 10:], rtol=1e-4, atol=1e-5)


def rms_norm_by_hand(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """iGPT's norm written out (docs/reference.md#model): x / sqrt(mean(x²) + 1e-5) · gain."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain


def test_features_shapes_and_values():
    model, x = tiny(), tokens()
    feats = model.features(x, [0, 1, 2])
    assert {k: v.shape for k, v in feats.items()} == {l: (3, 32) for l in (0, 1, 2)}
    # Layer 0 from the raw parameters: SOS then the pixels' token embeddings, plus positions, normalised, pooled.
    h0 = torch.cat([model.sos.expand(3, 1, -1), model.wte.weight[x[:, :-1]]], 1) + model.wpe.weight[:64]
    torch.testing.assert_close(feats[0], rms_norm_by_hand(h0, model.h[0].ln_1.weight).mean(1))
    # Layer 1 and the final norm from what the ordinary forward pass (the logits' path) feeds block 1 and the head.
    seen = {}
    model.h[1].register_forward_pre_hook(lambda _, args: seen.__setitem__("block1_in", args[0]))
    model.lm_head.register_forward_pre_hook(lambda _, args: seen.__setitem__("head_in", args[0]))
    model(x)
    torch.testing.assert_close(feats[1], rms_norm_by_hand(seen["block1_in"], model.h[1].ln_1.weight).mean(1))
    torch.testing.assert_close(feats[2], seen["head_in"].mean(1))
    with pytest.raises(ValueError):
        model.features(x, [3])


def test_bert_features_are_taken_from_masked_inputs_averaged_over_keyed_masks():
    """Feature extraction sees a BERT model's input as training did (masked; OpenAI's code masks every forward),
    averaged over n keyed masks (the paper ensembles BERT masks); 0 = unmasked; AR models are never masked."""
    from igpt_ds.eval.features import eval_features
    from igpt_ds.models.objectives import eval_bert_mask, eval_bert_masks

    model, x = tiny("bert"), tokens()
    idx = np.arange(40, 40 + len(x))
    masks = [eval_bert_mask(model.cfg, idx, j) for j in range(3)]
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], eval_bert_mask(model.cfg, idx[::-1], 0).flip(0))  # keyed by image, not by batch
    by_hand = sum(model.features(x, [1, 2], m)[1] for m in masks) / 3
    assert all(torch.equal(a, b) for a, b in zip(eval_bert_masks(model.cfg, idx, 3), masks, strict=True))
    torch.testing.assert_close(eval_features(model, x, [1, 2], masks)[1], by_hand)
    torch.testing.assert_close(eval_features(model, x, [1], eval_bert_masks(model.cfg, idx, 0))[1],
                               model.features(x, [1])[1])  # fmt: skip
    assert (eval_features(model, x, [1], masks[:1])[1] - model.features(x, [1])[1]).abs().max() > 1e-4
    ar = tiny("ar")
    assert eval_bert_masks(ar.cfg, idx, 3) == []
