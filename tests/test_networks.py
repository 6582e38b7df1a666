import pytest
import torch
from torch import nn

from pyro_vae.networks import ACTIVATION_CHOICES, ACTIVATIONS, MLP, GatedDense, get_activation


def test_mlp_layer_sizes_follow_input_hidden_output():
    mlp = MLP(5, [7, 9], 3)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 7), (7, 9), (9, 3)]
    assert mlp.input_dim == 5 and mlp.output_dim == 3


def test_mlp_activations_sit_between_layers_never_at_the_end():
    mlp = MLP(5, [7, 9], 3)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_mlp_without_hidden_layers_is_one_linear_map():
    mlp = MLP(4, [], 2)
    assert len(mlp) == 1 and isinstance(mlp[0], nn.Linear)
    assert (mlp[0].in_features, mlp[0].out_features) == (4, 2)


def test_mlp_accepts_leading_batch_dims():
    # The estimators run the networks on inputs of shape (particles, data, features).
    mlp = MLP(5, [8], 3)
    x = torch.randn(4, 6, 5)
    out = mlp(x)
    assert out.shape == (4, 6, 3)
    torch.testing.assert_close(out[2], mlp(x[2]))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_registered_activation_is_used_between_layers(name):
    mlp = MLP(3, [4, 4], 2, activation=name)
    activations = [m for m in mlp if not isinstance(m, nn.Linear)]
    assert len(activations) == 2
    assert all(type(m) is ACTIVATIONS[name] for m in activations)
    assert activations[0] is not activations[1]
    assert torch.isfinite(mlp(torch.randn(5, 3))).all()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_get_activation_builds_a_fresh_module(name):
    first, second = get_activation(name), get_activation(name)
    assert type(first) is ACTIVATIONS[name] and first is not second


def test_get_activation_unknown_name_error():
    message = r"unknown activation 'swish'; choose one of \['elu', 'gelu', 'relu'"
    with pytest.raises(ValueError, match=message):
        get_activation("swish")


def test_gated_mlp_has_gated_hidden_layers_and_a_linear_output():
    mlp = MLP(5, [7, 9], 3, activation="gated")
    assert [type(m) for m in mlp] == [GatedDense, GatedDense, nn.Linear]
    sizes = [(m.linear.in_features, m.linear.out_features) for m in list(mlp)[:2]]
    assert sizes == [(5, 7), (7, 9)] and (mlp[2].in_features, mlp[2].out_features) == (9, 3)
    assert [type(m) for m in MLP(4, [], 2, activation="gated")] == [nn.Linear]


def test_gated_dense_is_a_linear_map_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer = GatedDense(4, 3)
    x = torch.randn(2, 5, 4)
    h = x @ layer.linear.weight.T + layer.linear.bias
    g = 1 / (1 + torch.exp(-(x @ layer.gate.weight.T + layer.gate.bias)))
    torch.testing.assert_close(layer(x), h * g)


def test_activation_choices_name_activations_and_gated_layers():
    assert set(ACTIVATION_CHOICES) == set(ACTIVATIONS) | {"gated"}
    with pytest.raises(ValueError, match=r"unknown activation 'swish'; choose one of \['elu'"):
        MLP(3, [4], 2, activation="swish")
