import pytest
import torch

from pyro_vae.devices import (
    check_device_name,
    fork_rng,
    get_rng_state,
    resolve_device,
    set_rng_state,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fake_cuda(monkeypatch, available: bool, count: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_check_device_name_accepts_the_known_forms(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "", "cuda:x", "mps", None])
def test_check_device_name_rejects_naming_the_value_and_forms(name):
    with pytest.raises(
        ValueError, match=rf"unknown device {name!r}; choose auto, cpu, cuda or cuda:N"
    ):
        check_device_name(name)


def test_resolve_device_cpu_and_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_device_auto_follows_cuda_availability(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    assert resolve_device("auto") == torch.device("cpu")
    fake_cuda(monkeypatch, available=True, count=1)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_device_cuda_without_cuda_error(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        message = rf"device {str(name)!r} was requested but CUDA is not available on this machine"
        with pytest.raises(ValueError, match=message + r"; use device 'cpu'"):
            resolve_device(name)


def test_resolve_device_cuda_index_out_of_range_error(monkeypatch):
    fake_cuda(monkeypatch, available=True, count=2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    message = (
        r"'cuda:2' was requested but this machine has 2 CUDA device\(s\); use cuda:0 to cuda:1"
    )
    with pytest.raises(ValueError, match=message):
        resolve_device("cuda:2")


def test_resolve_device_unknown_name_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_fork_rng_restores_the_cpu_generator(device):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with fork_rng(device):
        inside = torch.rand(4)
    torch.testing.assert_close(inside, expected)  # the block draws from the caller's state
    torch.testing.assert_close(torch.rand(4), expected)  # ... and leaves it as it was


def test_fork_rng_restores_after_an_error():
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"):
        with fork_rng("cpu"):
            torch.rand(10)
            raise RuntimeError("inside")
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_state_round_trip_on_cpu():
    cpu = torch.device("cpu")
    state = get_rng_state(cpu)
    assert set(state) == {"torch", "cuda"} and state["cuda"] == []
    first = torch.rand(5)
    torch.rand(7)  # move the generator on
    set_rng_state(state, cpu)
    torch.testing.assert_close(torch.rand(5), first)


@CUDA
def test_rng_state_round_trip_and_fork_on_cuda():
    cuda = torch.device("cuda")
    state = get_rng_state(cuda)
    assert len(state["cuda"]) == 1
    first = torch.rand(5, device=cuda)
    set_rng_state(state, cuda)
    torch.testing.assert_close(torch.rand(5, device=cuda), first)
    before = torch.cuda.get_rng_state(cuda)
    with fork_rng(cuda):
        torch.rand(5, device=cuda)
    assert torch.equal(torch.cuda.get_rng_state(cuda), before)
