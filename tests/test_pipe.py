"""The pipeline layers compute the monolithic model, and their names map to it (no process group)."""

import pytest
import torch

from igpt_ds.config import ModelConfig
from igpt_ds.model import IGPT, Block, bert_mask, objective_loss
from igpt_ds.pipe import EmbedPipe, HeadPipe, bert_pipe_batch, igpt_name, pipe_loss


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
