"""Devices and random state: which device a name means, and how to draw random numbers on it
without disturbing anyone else's.

``auto`` means CUDA when it is available, else the CPU; asking for CUDA where there is none is a
clear error, never a silent fallback. Code that must not move the caller's random numbers (an
evaluation, building a model to check its shapes) runs under :func:`fork_rng`, which saves and
restores the CPU generator and, for a CUDA device, that device's generator only, so a CPU run
never initialises CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: What a device name may be, for error messages.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: object) -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is present is
    checked by :func:`resolve_device`).

    :raises ValueError: naming the value and the allowed forms.
    """
    try:
        known = isinstance(name, str) and (
            name == "auto" or torch.device(name).type in ("cpu", "cuda")
        )
    except (RuntimeError, TypeError):
        known = False
    if not known:
        raise ValueError(f"unknown device {name!r}; choose {DEVICE_CHOICES}")
    return name


def resolve_device(name: str | torch.device) -> torch.device:
    """The :class:`torch.device` a name means on this machine.

    :param name: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or a
        :class:`torch.device`.
    :raises ValueError: for an unknown name, or CUDA (or a CUDA index) this machine lacks.
    """
    if isinstance(name, torch.device):
        name = str(name)
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but CUDA is not available on this machine; "
            "use device 'cpu' (or 'auto')"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device {name!r} was requested but this machine has {count} CUDA device(s); "
            f"use cuda:0 to cuda:{count - 1}"
        )
    return device


@contextlib.contextmanager
def fork_rng(device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with the global torch RNG saved and restored afterwards: the CPU generator
    and, when ``device`` is a CUDA device, that device's generator.

    :param device: the device the block draws on; ``None`` or a CPU device forks the CPU
        generator only.
    """
    device = torch.device(device) if device is not None else None
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def get_rng_state(device: torch.device) -> dict:
    """The generators that drive training on ``device``: ``torch`` (CPU) and ``cuda`` (a list
    holding the state of ``device``'s generator, empty on the CPU)."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`get_rng_state` saved (its CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), device)
