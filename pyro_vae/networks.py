"""Encoder and decoder networks: plain :mod:`torch.nn`, no Pyro calls."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pyro_vae.checks import check_choice

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}


def get_activation(name: str) -> nn.Module:
    """Build a registered activation module by name.

    :param str name: a key of :data:`ACTIVATIONS`.
    :raises ValueError: for an unknown name, naming the known ones.
    """
    return ACTIVATIONS[check_choice("activation", name, ACTIVATIONS)]()


class MLP(nn.Sequential):
    """A multilayer perceptron: Linear layers with an activation between them, none at the end.

    :param int input_dim: input features.
    :param hidden_dims: sizes of the hidden layers (may be empty: a linear map).
    :param int output_dim: output features.
    :param str activation: a key of :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        activation: str = "relu",
    ):
        dims = [input_dim, *hidden_dims, output_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(get_activation(activation))
            layers.append(nn.Linear(d_in, d_out))
        super().__init__(*layers)
        self.input_dim = input_dim
        self.output_dim = output_dim
