"""Encoder and decoder networks: plain :mod:`torch.nn`, no Pyro calls.

References:

[1] `VAE with a VampPrior`, Jakub M. Tomczak, Max Welling (AISTATS 2018): the gated dense
    layers of its MLPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_vae.checks import check_choice

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}


class GatedDense(nn.Module):
    """A gated dense layer, ``(W x + b) * sigmoid(V x + c)``: a linear map whose every output
    is scaled by a learned gate in (0, 1) [1].

    :param int input_dim: input features.
    :param int output_dim: output features.
    """

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)
        self.gate = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(x))


#: Hidden layers that are not a Linear map followed by an activation: name -> layer class,
#: built as ``cls(input_dim, output_dim)``.
HIDDEN_LAYERS: dict[str, type[nn.Module]] = {"gated": GatedDense}

#: What the ``activation`` of an :class:`MLP` may name: an activation or a hidden layer kind.
ACTIVATION_CHOICES = {**ACTIVATIONS, **HIDDEN_LAYERS}


def get_activation(name: str) -> nn.Module:
    """Build a registered activation module by name.

    :param str name: a key of :data:`ACTIVATIONS`.
    :raises ValueError: for an unknown name, naming the known ones.
    """
    return ACTIVATIONS[check_choice("activation", name, ACTIVATIONS)]()


class MLP(nn.Sequential):
    """A multilayer perceptron: Linear layers with an activation between them, none at the end.

    With ``activation="gated"`` each hidden layer is a :class:`GatedDense` layer instead (no
    activation after it) and the output layer is Linear, as in the VampPrior paper's MLPs.

    :param int input_dim: input features.
    :param hidden_dims: sizes of the hidden layers (may be empty: a linear map).
    :param int output_dim: output features.
    :param str activation: a key of :data:`ACTIVATIONS` or of :data:`HIDDEN_LAYERS`.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        activation: str = "relu",
    ):
        dims = [input_dim, *hidden_dims, output_dim]
        pairs = list(zip(dims[:-1], dims[1:]))
        layers: list[nn.Module] = []
        if check_choice("activation", activation, ACTIVATION_CHOICES) in HIDDEN_LAYERS:
            layers = [HIDDEN_LAYERS[activation](d_in, d_out) for d_in, d_out in pairs[:-1]]
        else:
            for d_in, d_out in pairs[:-1]:
                layers += [nn.Linear(d_in, d_out), get_activation(activation)]
        layers.append(nn.Linear(*pairs[-1]))
        super().__init__(*layers)
        self.input_dim = input_dim
        self.output_dim = output_dim
