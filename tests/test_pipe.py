"""The pipeline layers compute the monolithic model, and their names map to it (no process group)."""

import pytest
import torch

from igpt_ds.config import ModelConfig
from igpt_ds.distributed.process_group import without_cpu_shm_allreduce
from igpt_ds.models.igpt import IGPT, Block
from igpt_ds.models.objectives import bert_mask, objective_loss
from igpt_ds.models.pipe import EmbedPipe, HeadPipe, bert_pipe_batch, igpt_name, pipe_loss


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_pipeline_layers_equal_the_model(objective):
    cfg = ModelConfig(size="igpt-tiny", n_px=8, objective=objective)
    torch.manual_seed(0)
    model = IGPT(cfg).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    layers = [EmbedPipe(cfg), *(Block(cfg) for _ in range(cfg.n_layer)), HeadPipe(cfg)]
    state = model.state_dict()
    for idx, layer in enumerate(layers):  # the mapping that consolidated import/export use
        layer.load_state_dict({k: state[igpt_name(idx, k, cfg.n_layer)] for k in layer.state_dict()})
    assert {igpt_name(i, k, cfg.n_layer) for i, l in enumerate(layers) for k in l.state_dict()} == set(state)

    tokens = torch.randint(0, cfg.n_vocab, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    mask = bert_mask(tokens.shape, cfg.mask_prob) if objective == "bert" else None
    inputs, labels = bert_pipe_batch(tokens, mask, cfg.n_vocab) if mask is not None else (tokens, tokens)
    x = inputs
    for layer in layers:
        x = layer(x)
    expected = model(tokens, mask)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe_loss(x, labels), objective_loss(expected, tokens, mask))


def test_every_layout_and_stage_count_starts_from_the_same_distinct_layers(one_rank_group, monkeypatch):
    """Initial weights depend on (seed, layer index) only: IGPT, a one-stage IGPTPipe and each layer built alone
    after other draws from the RNG (what a later stage of a deeper pipeline does) agree; no two blocks match."""
    import deepspeed

    from igpt_ds.models.pipe import IGPTPipe, SeededLayerSpec

    monkeypatch.setenv("LOCAL_RANK", "0")
    without_cpu_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # DeepSpeed's view of the fixture's group
    cfg = ModelConfig(size="igpt-tiny", n_px=8, n_layer=3)
    state = IGPT(cfg, seed=5).state_dict()
    pipe = IGPTPipe(cfg, num_stages=1, seed=5)
    layers = dict(pipe.local_layers())
    assert set(layers) == set(range(cfg.n_layer + 2))
    for idx in reversed(range(cfg.n_layer + 2)):  # each layer alone, in another order, the RNG disturbed
        torch.rand(100)
        alone = SeededLayerSpec(5, idx, type(layers[idx]), cfg).build()
        for layer in (layers[idx], alone):
            for k, v in layer.state_dict().items():
                assert torch.equal(v, state[igpt_name(idx, k, cfg.n_layer)]), (idx, k)
    blocks = [state[f"h.{i}.attn.c_attn.weight"] for i in range(cfg.n_layer)]
    assert all(not torch.equal(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    assert not torch.equal(IGPT(cfg, seed=6).state_dict()["wte.weight"], state["wte.weight"])
