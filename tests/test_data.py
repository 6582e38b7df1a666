import functools
import gzip
import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pyro_vae import VAE
from pyro_vae.data import (
    BINARIZATIONS,
    DATASETS,
    Dataset,
    bernoulli_draw,
    check_finite,
    default_data_dir,
    iterate_batches,
    load_dataset,
    resolve_binarize,
    select_split,
    split_validation,
    validation_rows,
)

# Real MNIST beside the repository: CI runs on a fresh clone with ../shared next to it.
SHARED_DATA_DIR = Path(__file__).parents[1].parent / "shared" / "data"
IDX_FILE_SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}
TORCHVISION_DATASETS = [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _link_raw_files(raw_dir: Path, shared_data_dir: Path) -> None:
    raw_dir.mkdir(parents=True)
    for name in IDX_FILE_SIZES:
        (raw_dir / name).symlink_to(shared_data_dir / "MNIST" / "raw" / name)


@pytest.fixture(scope="module")
def shared_data_dir() -> Path:
    raw_dir = SHARED_DATA_DIR / "MNIST" / "raw"
    missing = [f for f in IDX_FILE_SIZES if not (raw_dir / f).is_file()]
    if missing:
        pytest.fail(
            f"real MNIST must be in {raw_dir} (the shared/ directory beside the repository); "
            f"missing {missing}"
        )
    return SHARED_DATA_DIR


@pytest.fixture(scope="module")
def fashion_data_dir(shared_data_dir, tmp_path_factory) -> Path:
    """No Fashion-MNIST files are stored: the MNIST files (same names and sizes) stand in
    for them to exercise the FashionMNIST/raw code path offline."""
    data_dir = tmp_path_factory.mktemp("fashion")
    _link_raw_files(data_dir / "FashionMNIST" / "raw", shared_data_dir)
    return data_dir


# The fixture giving each registered dataset's data directory (None: needs no files).
DATA_DIR_FIXTURES = {
    "digits": None,
    "mnist": "shared_data_dir",
    "fashion-mnist": "fashion_data_dir",
}


@pytest.fixture(scope="module")
def load_grey(request):
    """Load each dataset with grey levels at most once per module (MNIST takes ~1 s).

    Data directories are requested lazily so that digits tests do not need the MNIST files.
    """

    @functools.cache
    def load(name: str) -> Dataset:
        fixture = DATA_DIR_FIXTURES[name]
        return load_dataset(name, fixture and request.getfixturevalue(fixture))

    return load


@pytest.fixture(scope="module")
def mnist_mirror(shared_data_dir, tmp_path_factory):
    """An HTTP mirror on localhost serving gzip copies of the real files, and their md5s.

    HTTP rather than ``file://``: torchvision 0.29's downloader reads ``response.length``,
    which ``file://`` responses lack.
    """
    mirror_dir = tmp_path_factory.mktemp("mirror")
    resources = []
    for name in IDX_FILE_SIZES:
        archive = mirror_dir / f"{name}.gz"
        raw = (shared_data_dir / "MNIST" / "raw" / name).read_bytes()
        archive.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        resources.append((archive.name, hashlib.md5(archive.read_bytes()).hexdigest()))

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(mirror_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", resources
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Point every torchvision mirror at a directory that does not exist."""
    import torchvision.datasets

    unreachable = (tmp_path / "no-such-mirror").as_uri() + "/"
    for _, class_name in TORCHVISION_DATASETS:
        monkeypatch.setattr(getattr(torchvision.datasets, class_name), "mirrors", [unreachable])


# ---------------------------------------------------------------- every registered dataset


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_contract(name, load_grey):
    data = load_grey(name)
    assert data.name == name
    assert data.binarize == "none"
    height, width = data.image_shape
    assert data.data_dim == height * width
    for x, y in [(data.train_x, data.train_y), (data.test_x, data.test_y)]:
        assert x.dim() == 2 and x.shape[1] == data.data_dim
        assert y.shape == (x.shape[0],)
        assert x.dtype == torch.float32 and y.dtype == torch.long
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(y.unique().tolist()) == set(range(10))
        assert x.device.type == "cpu" and y.device.type == "cpu"
    check_finite(data.train_x, "train_x")
    assert name in repr(data) and "tensor" not in repr(data)


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_and_grey_levels(load_grey):
    data = load_grey("digits")
    assert data.train_x.shape == (1497, 64) and data.test_x.shape == (300, 64)
    assert data.image_shape == (8, 8)
    # sklearn stores 17 grey levels 0..16
    assert torch.equal(data.train_x * 16, (data.train_x * 16).round())


def test_digits_split_is_fixed_partition(load_grey):
    data = load_grey("digits")
    again = load_dataset("digits")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(data, field), getattr(again, field))
    digits = load_digits()
    # The recipe in data.py: numpy's legacy RandomState(0), frozen across numpy versions,
    # permutes the 1797 digits; the first 300 are the test set, the rest the training set.
    # Derived here rather than pinned, so a change of split (e.g. a library upgrade) fails.
    order = np.random.RandomState(0).permutation(len(digits.target))
    splits = [(order[:300], data.test_x, data.test_y), (order[300:], data.train_x, data.train_y)]
    for idx, x, y in splits:
        assert y.tolist() == digits.target[idx].tolist()
        assert torch.equal(x, torch.as_tensor(digits.data[idx], dtype=torch.float32) / 16)
    all_y = torch.cat([data.train_y, data.test_y])
    assert all_y.bincount().tolist() == np.bincount(digits.target).tolist()
    all_pixel_sum = torch.cat([data.train_x, data.test_x]).double().sum() * 16
    assert all_pixel_sum.item() == pytest.approx(digits.data.sum())


# ----------------------------------------------------------------------------------- MNIST


def test_mnist_shapes_and_known_labels(load_grey):
    data = load_grey("mnist")
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert data.image_shape == (28, 28)
    assert data.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert data.train_y.bincount().tolist() == MNIST_TRAIN_LABEL_COUNTS
    assert data.test_y.bincount().tolist() == MNIST_TEST_LABEL_COUNTS
    # uint8 pixels divided by 255
    assert torch.allclose(data.test_x * 255, (data.test_x * 255).round(), atol=1e-4)


@pytest.mark.parametrize("name, class_name", TORCHVISION_DATASETS)
def test_download_from_mirror_into_empty_dir(
    name, class_name, mnist_mirror, load_grey, monkeypatch, tmp_path
):
    import torchvision.datasets

    url, resources = mnist_mirror
    cls = getattr(torchvision.datasets, class_name)
    monkeypatch.setattr(cls, "mirrors", [url])
    monkeypatch.setattr(cls, "resources", resources)
    data_dir = tmp_path / "empty"

    data = load_dataset(name, data_dir)

    raw_dir = data_dir / class_name / "raw"
    assert {f: (raw_dir / f).stat().st_size for f in IDX_FILE_SIZES} == IDX_FILE_SIZES
    mnist = load_grey("mnist")
    assert torch.equal(data.train_y, mnist.train_y)
    assert torch.equal(data.test_x, mnist.test_x)


@pytest.mark.parametrize("mirror", ["missing-dir", "refused"])
@pytest.mark.parametrize("name, class_name", TORCHVISION_DATASETS)
def test_missing_files_without_network_error(name, class_name, mirror, monkeypatch, tmp_path):
    import torchvision.datasets

    url = (tmp_path / "no-mirror").as_uri() + "/" if mirror == "missing-dir" else _closed_port_url()
    monkeypatch.setattr(getattr(torchvision.datasets, class_name), "mirrors", [url])
    raw_dir = tmp_path / "data" / class_name / "raw"

    with pytest.raises(FileNotFoundError, match=re.escape(str(raw_dir))) as excinfo:
        load_dataset(name, tmp_path / "data")

    message = str(excinfo.value)
    assert "\n" not in message
    assert all(file_name in message for file_name in IDX_FILE_SIZES)
    assert "config.data_dir" in message and "PYRO_VAE_DATA" in message
    assert "download failed" in message


def test_missing_files_uses_default_data_dir(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "env-dir"))
    raw_dir = tmp_path / "env-dir" / "MNIST" / "raw"
    with pytest.raises(FileNotFoundError, match=re.escape(str(raw_dir))):
        load_dataset("mnist")


@pytest.mark.parametrize("bad_file", sorted(IDX_FILE_SIZES))
def test_truncated_file_error(bad_file, shared_data_dir, no_network, tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    _link_raw_files(raw_dir, shared_data_dir)
    (raw_dir / bad_file).unlink()
    with open(shared_data_dir / "MNIST" / "raw" / bad_file, "rb") as f:
        (raw_dir / bad_file).write_bytes(f.read(1000))

    expected = f"{bad_file} is 1000 bytes but an intact {bad_file} is {IDX_FILE_SIZES[bad_file]}"
    with pytest.raises(ValueError, match=re.escape(expected)) as excinfo:
        load_dataset("mnist", tmp_path)
    assert "delete it" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert (raw_dir / bad_file).stat().st_size == 1000  # never deletes user files


def test_truncated_file_detected_even_when_others_missing(no_network, tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "t10k-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + bytes(100))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is 104 bytes.*10008"):
        load_dataset("mnist", tmp_path)


def test_wrong_magic_number_error(shared_data_dir, no_network, tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    _link_raw_files(raw_dir, shared_data_dir)
    (raw_dir / "train-labels-idx1-ubyte").unlink()
    (raw_dir / "train-labels-idx1-ubyte").write_bytes(bytes(60008))
    with pytest.raises(
        ValueError, match="train-labels-idx1-ubyte starts with magic number 0 .*2049"
    ):
        load_dataset("mnist", tmp_path)


def test_gzipped_file_under_raw_name_error(no_network, tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    (raw_dir / "t10k-labels-idx1-ubyte").write_bytes(gzip.compress(bytes(10008)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte is gzip-compressed; gunzip"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------- binarization


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_static_binarization_fixed_and_independent_of_global_rng(load_grey):
    grey = load_grey("digits")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = load_dataset("digits", binarize="static")
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(2)
    second = load_dataset("digits", binarize="static")
    assert first.binarize == "static"
    for x in (first.train_x, first.test_x):
        assert _is_binary(x) and x.dtype == torch.float32
    assert torch.equal(first.train_x, second.train_x)
    assert torch.equal(first.test_x, second.test_x)
    # a Bernoulli draw of the grey levels: 0 and 1 are kept, the mean is close
    assert torch.equal(first.train_x[grey.train_x == 0], grey.train_x[grey.train_x == 0])
    assert torch.equal(first.train_x[grey.train_x == 1], grey.train_x[grey.train_x == 1])
    # 4.7 standard errors, sqrt(sum p(1-p)) / n = 0.00086 over the 95,808 training pixels
    assert first.train_x.mean().item() == pytest.approx(grey.train_x.mean().item(), abs=0.004)
    assert torch.equal(first.train_y, grey.train_y)


def test_static_binarization_draws_each_grey_level_as_a_bernoulli(load_grey):
    # The dynamic test set is this static one (test_dynamic_binarization_...).
    grey = load_grey("digits")
    data = load_dataset("digits", binarize="static")
    for levels, binary in [(grey.train_x, data.train_x), (grey.test_x, data.test_x)]:
        for k in range(17):  # 0 and 1 are kept exactly (stderr 0)
            p = k / 16
            ones = binary[levels == p]
            # 4.5 standard errors: over 2 x 15 grey levels, a false alarm has odds of 2e-4.
            # A threshold at 0.5 instead of a draw is off by p or 1 - p, at least 1/16.
            stderr = (p * (1 - p) / ones.numel()) ** 0.5
            assert ones.mean().item() == pytest.approx(p, abs=4.5 * stderr), (k, ones.numel())


def test_dynamic_binarization_grey_train_fixed_binary_test(load_grey):
    grey = load_grey("digits")
    static = load_dataset("digits", binarize="static")
    torch.manual_seed(3)
    dynamic = load_dataset("digits", binarize="dynamic")
    assert dynamic.binarize == "dynamic"
    assert torch.equal(dynamic.train_x, grey.train_x)
    assert torch.equal(dynamic.test_x, static.test_x)
    assert _is_binary(dynamic.test_x) and not _is_binary(dynamic.train_x)


def test_no_binarization_keeps_grey_levels(load_grey):
    data = load_dataset("digits", binarize="none")
    assert torch.equal(data.test_x, load_grey("digits").test_x)
    assert not _is_binary(data.train_x) and not _is_binary(data.test_x)


def test_load_dataset_moves_to_device():
    data = load_dataset("digits", device=torch.device("meta"))
    tensors = (data.train_x, data.train_y, data.test_x, data.test_y)
    assert all(t.device.type == "meta" for t in tensors)


def test_load_dataset_unknown_name_error():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'nope'.*" + re.escape(str(sorted(DATASETS)))
    ):
        load_dataset("nope")


def test_load_dataset_unknown_binarization_error():
    with pytest.raises(ValueError, match=r"'bogus'.*" + re.escape(str(sorted(BINARIZATIONS)))):
        load_dataset("digits", binarize="bogus")


def test_load_dataset_unknown_device_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_dataset("digits", device="gpu")


def test_load_dataset_resolves_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_dataset("digits", device="auto").train_x.device.type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_dataset("digits", device="cuda")


# ----------------------------------------------------------------- binarization policy


def test_resolve_binarize_follows_the_likelihood_support():
    vae = VAE(64, hidden_dims=(8,))
    assert resolve_binarize(None, vae.likelihood) == "dynamic"
    assert resolve_binarize("none", vae.likelihood) == "none"
    gaussian = VAE(64, hidden_dims=(8,), likelihood="normal")
    assert resolve_binarize(None, gaussian.likelihood) == "none"
    assert resolve_binarize(None, type(gaussian.likelihood)) == "none"


def test_train_split_is_binarized_with_a_fixed_seed(digits):
    state = torch.get_rng_state()
    x = select_split(digits, "train")
    assert torch.equal(x, select_split(digits, "train"))
    assert torch.equal(torch.get_rng_state(), state)
    assert set(x.unique().tolist()) == {0.0, 1.0} and x.shape == digits.train_x.shape
    assert select_split(digits, "test") is digits.test_x


def test_select_split_of_grey_or_static_data_is_the_split_itself(load_grey):
    grey = load_grey("digits")
    assert select_split(grey, "train") is grey.train_x
    static = load_dataset("digits", binarize="static")
    assert select_split(static, "train") is static.train_x
    with pytest.raises(
        ValueError, match=r"unknown split 'valid'; choose one of \['test', 'train'\]"
    ):
        select_split(grey, "valid")


# ------------------------------------------------------------------------- default_data_dir


def test_default_data_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"


def test_default_data_dir_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "pyro_vae"


def test_default_data_dir_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".cache" / "pyro_vae"


# -------------------------------------------------------------------------- iterate_batches


@pytest.mark.parametrize("batch_size, sizes", [(1, [1] * 10), (3, [3, 3, 3, 1]), (10, [10])])
@pytest.mark.parametrize("shuffle", [True, False])
def test_iterate_batches_covers_each_row_once(batch_size, sizes, shuffle):
    x = torch.arange(10.0).unsqueeze(-1).expand(10, 2)
    batches = list(iterate_batches(x, batch_size, shuffle=shuffle))
    assert [len(b) for b in batches] == sizes
    rows = torch.cat(batches)[:, 0]
    assert sorted(rows.tolist()) == list(range(10))
    if not shuffle:
        assert torch.equal(torch.cat(batches), x)


def test_iterate_batches_reproducible_under_manual_seed():
    x = torch.arange(100.0).unsqueeze(-1)
    torch.manual_seed(0)
    first_epoch = torch.cat(list(iterate_batches(x, 7)))[:, 0]
    second_epoch = torch.cat(list(iterate_batches(x, 7)))[:, 0]
    torch.manual_seed(0)
    assert torch.equal(torch.cat(list(iterate_batches(x, 7)))[:, 0], first_epoch)
    torch.manual_seed(0)
    assert torch.equal(first_epoch.long(), torch.randperm(100))  # the global RNG, nothing else
    assert not torch.equal(first_epoch, second_epoch)


def test_iterate_batches_dynamic_binarization():
    x = torch.full((2000, 5), 0.3)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    torch.manual_seed(0)
    batches = list(iterate_batches(x, 500, binarize=True))
    torch.manual_seed(0)
    again = list(iterate_batches(x, 500, binarize=True))
    other_epoch = torch.cat(list(iterate_batches(x, 500, binarize=True)))
    binary = torch.cat(batches)
    assert _is_binary(binary)
    assert torch.equal(binary, torch.cat(again))
    assert not torch.equal(binary, other_epoch)  # fresh draws every epoch
    assert (binary[:, 0] == 0).all() and (binary[:, 1] == 1).all()
    assert binary[:, 2:].mean().item() == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("batch_size", [0, -1, 11])
def test_iterate_batches_bad_batch_size_error(batch_size):
    # raised at the call, before any batch is requested
    with pytest.raises(ValueError, match=rf"in \[1, 10\], got {batch_size}"):
        iterate_batches(torch.zeros(10, 2), batch_size)


def test_iterate_batches_bad_input_errors():
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 10\], got 2.0"):
        iterate_batches(torch.zeros(10, 2), 2.0)
    with pytest.raises(ValueError, match="empty tensor"):
        iterate_batches(torch.zeros(0, 2), 1)
    with pytest.raises(TypeError, match="x must be a tensor"):
        iterate_batches(np.zeros((10, 2)), 2)


# ---------------------------------------------------------------------------- check_finite


def test_check_finite_passes_finite_data():
    check_finite(torch.rand(4, 3), "x")


def test_check_finite_error_names_count_and_rows():
    x = torch.zeros(6, 3)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    x[4, 1] = float("-inf")
    with pytest.raises(
        ValueError, match=r"train_x has 3 non-finite .* 2 rows, first rows \[1, 4\]"
    ):
        check_finite(x, "train_x")


def test_download_off_never_writes_into_the_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"downloading is off .*config\.data_dir"):
        load_dataset("mnist", tmp_path, download=False)
    assert list(tmp_path.iterdir()) == []


def test_bernoulli_draw_has_the_bernoulli_distribution():
    """100,000 draws per probability: every mean within 5 standard errors of p, exact at 0 and
    1, the dtype kept, and the draws fixed by the global seed."""
    probs = torch.tensor([0.0, 0.03, 0.5, 0.9, 1.0], dtype=torch.float64)
    p = probs.repeat(100_000, 1)
    torch.manual_seed(3)
    x = bernoulli_draw(p)
    assert x.dtype == torch.float64 and set(x.unique().tolist()) <= {0.0, 1.0}
    stderr = (probs * (1 - probs) / p.shape[0]).sqrt()
    assert ((x.mean(0) - probs).abs() <= 5 * stderr).all(), x.mean(0)
    torch.manual_seed(3)
    assert torch.equal(bernoulli_draw(p), x)


# -- the validation split ------------------------------------------------------------------------


def test_validation_rows_partition_the_training_split_and_are_fixed_by_the_seed():
    train, valid = validation_rows(1497, 300, seed=4)
    assert (len(train), len(valid)) == (1197, 300)
    assert torch.equal(torch.cat([train, valid]).sort().values, torch.arange(1497))
    assert not set(train.tolist()) & set(valid.tolist())
    again = validation_rows(1497, 300, seed=4)
    assert torch.equal(again[0], train) and torch.equal(again[1], valid)
    assert not torch.equal(validation_rows(1497, 300, seed=5)[1], valid)
    # Holding out more images keeps no fewer of the first draw's: a prefix of one permutation.
    assert set(valid.tolist()) <= set(validation_rows(1497, 400, seed=4)[1].tolist())


def test_validation_rows_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    validation_rows(100, 10, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("size", [-1, 1497, 2000, 2.5])
def test_validation_rows_bad_size_error(size):
    with pytest.raises(
        ValueError, match=rf"validation_size must be an integer in \[0, 1496\], got {size}"
    ):
        validation_rows(1497, size)


def test_split_validation_holds_out_binarized_training_images(digits):
    train, valid_x = split_validation(digits, 200, seed=0)
    rows_kept, rows_out = validation_rows(len(digits.train_x), 200, seed=0)
    assert torch.equal(train.train_x, digits.train_x[rows_kept])
    assert torch.equal(train.train_y, digits.train_y[rows_kept])
    assert train.test_x is digits.test_x and train.binarize == "dynamic"
    # Dynamic binarization: the held-out grey levels are drawn once, to the same binary images.
    assert set(valid_x.unique().tolist()) <= {0.0, 1.0} and valid_x.shape == (200, 64)
    assert torch.equal(valid_x, split_validation(digits, 200, seed=0)[1])
    grey = digits.train_x[rows_out]
    assert torch.all(valid_x[grey == 0] == 0) and torch.all(valid_x[grey == 1] == 1)
    kept, none = split_validation(digits, 0)
    assert kept is digits and none is None
    grey_levels = load_dataset("digits", binarize="none")
    held_out = validation_rows(1497, 5, seed=2)[1]
    assert torch.equal(split_validation(grey_levels, 5, seed=2)[1], grey_levels.train_x[held_out])
