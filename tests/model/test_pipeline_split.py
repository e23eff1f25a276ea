"""The pipeline's cut of the model (kimi_train/parallel/pipeline.py), in one process: stage layouts,
names under any split, and the stages chained equal to the whole model (forward and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch

from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.parallel.pipeline import layer_index, split_model, stage_layers


def test_stage_layers_even_uneven_and_given():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2) == [[0, 1, 2], [3, 4]]  # the first stages take the remainder
    assert stage_layers(4, 4) == [[0], [1], [2], [3]]
    assert stage_layers(4, 2, [1, 3]) == [[0], [1, 2, 3]]
    assert stage_layers(4, 2, [0, 4]) == [[], [0, 1, 2, 3]]  # stage 0: the embedding alone
    with pytest.raises(ValueError, match="pp_layout=.1, 2. must give 2 stages that sum to model.num_hidden_layers=4"):
        stage_layers(4, 2, [1, 2])
    with pytest.raises(ValueError, match="num_hidden_layers=2 is fewer than the 4 pipeline stages"):
        stage_layers(2, 4)


@pytest.mark.parametrize("layout", [[2, 2], [1, 3], [1, 1, 1, 1]])
def test_stages_keep_the_whole_models_names_and_chain_to_its_loss(layout):
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    whole = KimiForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.randint(0, cfg.vocab_size, (2, 16))
    whole(ids, labels=labels).backward()

    layers = stage_layers(cfg.num_hidden_layers, len(layout), layout)
    parts = []
    for s in range(len(layout)):  # one rank's model per stage, as split_model leaves it
        model = copy.deepcopy(whole)
        model.zero_grad(set_to_none=True)
        (stage,) = split_model(model, layers, [s])
        parts.append((model, stage))
    names = [set(model.state_dict()) for model, _ in parts]
    assert set().union(*names) == set(whole.state_dict())
    for s, (model, stage) in enumerate(parts):
        assert [int(k) for k in model.model.layers.keys()] == layers[s]
        assert layer_index(model)["attention"] == layers[s]
        assert {n for n, _ in stage.named_parameters()} <= {n.removeprefix("model.") for n in names[s]} | {
            "lm_head.weight"}
        assert sum(p.numel() for p in stage.parameters()) == sum(p.numel() for p in model.parameters())

    h = ids
    for model, stage in parts[:-1]:
        h = stage(h)
    loss = parts[-1][1](h, labels)
    loss.backward()
    torch.testing.assert_close(loss, whole(ids, labels=labels), rtol=0, atol=0)
    grads = {n: p.grad for model, _ in parts for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, p in whole.named_parameters()}
    for n, p in whole.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
