"""Datasets, binarization and batching on the device.

This module is the one home of the binarization policy: which binarization a likelihood gets
(:func:`resolve_binarize`), the fixed seeds of the one-off draws (:func:`load_dataset`) and the
binary images an evaluation sees of a dynamically binarized training split
(:func:`select_split`).

Every dataset is returned as flat float32 tensors in ``[0, 1]`` with a fixed train/test split,
so results compare across runs. ``digits`` (scikit-learn's bundled 8x8 digits) needs no files
and is the default; ``mnist`` and ``fashion-mnist`` are read through torchvision from
``<data_dir>/MNIST/raw`` and ``<data_dir>/FashionMNIST/raw``, downloading them when missing.

References:

[1] `Gradient-based learning applied to document recognition` (MNIST),
    Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, 1998.
[2] `Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms`,
    H. Xiao, K. Rasul, R. Vollgraf, 2017.
[3] `On the Quantitative Analysis of Deep Belief Networks` (binarized MNIST),
    R. Salakhutdinov, I. Murray, 2008.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions import constraints

from pyro_vae.checks import check_choice, check_int
from pyro_vae.devices import resolve_device

logger = logging.getLogger(__name__)

BINARIZATIONS = ("dynamic", "static", "none")

#: The splits of every data set, as :func:`select_split` names them.
SPLITS = ("test", "train")

# Fixed seeds of the one-off Bernoulli draws: the test set (for "static" and "dynamic") and
# the training set (for "static") are the same in every run and never touch the global RNG.
_TEST_BINARIZATION_SEED = 0
_TRAIN_BINARIZATION_SEED = 1
#: Seed of the one-off binarization of a dynamically binarized training split for evaluation.
TRAIN_EVALUATION_SEED = 2
#: Seed of the one-off binarization of the validation images of a dynamically binarized data set.
VALIDATION_BINARIZATION_SEED = 3
_DIGITS_SPLIT_SEED = 0
_DIGITS_NUM_TEST = 300

# Uncompressed idx files shared by MNIST and Fashion-MNIST: name -> (magic number, size in bytes).
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_FILES = {
    "train-images-idx3-ubyte": (_IDX_IMAGES_MAGIC, 16 + 60000 * 28 * 28),
    "train-labels-idx1-ubyte": (_IDX_LABELS_MAGIC, 8 + 60000),
    "t10k-images-idx3-ubyte": (_IDX_IMAGES_MAGIC, 16 + 10000 * 28 * 28),
    "t10k-labels-idx1-ubyte": (_IDX_LABELS_MAGIC, 8 + 10000),
}
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Dataset:
    """A dataset with a fixed train/test split, as flat tensors on one device.

    :param str name: registry name, a key of :data:`DATASETS`.
    :param Tensor train_x: training images, shape ``(N, D)``, float32 in ``[0, 1]``.
    :param Tensor train_y: training labels, shape ``(N,)``, long.
    :param Tensor test_x: test images, shape ``(M, D)``, float32 in ``[0, 1]``.
    :param Tensor test_y: test labels, shape ``(M,)``, long.
    :param tuple image_shape: ``(H, W)`` with ``H * W == D``, to reshape rows for plotting.
    :param str binarize: the binarization it was loaded with, one of :data:`BINARIZATIONS`;
        ``"dynamic"`` means ``train_x`` holds grey levels that each batch should binarize
        (``iterate_batches(..., binarize=True)``).
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    image_shape: tuple[int, int]
    binarize: str = "none"

    @property
    def data_dim(self) -> int:
        """Number of pixels per datapoint, ``D``."""
        return self.train_x.shape[-1]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train_x={tuple(self.train_x.shape)}, "
            f"test_x={tuple(self.test_x.shape)}, image_shape={self.image_shape}, "
            f"binarize={self.binarize!r}, device={self.train_x.device})"
        )


def default_data_dir() -> Path:
    """Where datasets are looked for and downloaded when no directory is given.

    ``$PYRO_VAE_DATA`` if set, else ``$XDG_CACHE_HOME/pyro_vae``, else ``~/.cache/pyro_vae``.
    The directory is not created.

    :returns: the data directory.
    :rtype: pathlib.Path
    """
    if os.environ.get("PYRO_VAE_DATA"):
        return Path(os.environ["PYRO_VAE_DATA"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME")
    if cache_home:
        return Path(cache_home).expanduser() / "pyro_vae"
    return Path.home() / ".cache" / "pyro_vae"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    binarize: str = "none",
    device: str | torch.device = "cpu",
    download: bool = True,
) -> Dataset:
    """Load a registered dataset with its fixed train/test split.

    Binarization draws ``x ~ Bernoulli(grey level)``:

    - ``"none"``: grey levels in both sets.
    - ``"static"``: both sets binarized once, with fixed seeds (the same in every run).
    - ``"dynamic"``: the training set stays grey-level and is binarized afresh per batch by
      :func:`iterate_batches`; the test set is binarized once, exactly as for ``"static"``.

    The fixed draws use private generators, so loading never consumes the global RNG.

    :param str name: a key of :data:`DATASETS`.
    :param data_dir: where ``mnist`` / ``fashion-mnist`` files are (or are downloaded to);
        defaults to :func:`default_data_dir`. ``digits`` ignores it.
    :type data_dir: str or os.PathLike or None
    :param str binarize: one of :data:`BINARIZATIONS`.
    :param device: device of the returned tensors: a name for
        :func:`~pyro_vae.devices.resolve_device` (``auto`` too) or a :class:`torch.device`.
    :type device: str or torch.device
    :returns: the dataset.
    :rtype: Dataset
    :raises ValueError: unknown name, binarization or device, or a corrupt data file.
    :raises FileNotFoundError: data files missing and the download failed.

    >>> data = load_dataset("digits", binarize="static")
    >>> data.train_x.shape, data.image_shape
    (torch.Size([1497, 64]), (8, 8))
    """
    check_choice("dataset", name, DATASETS)
    check_choice("binarization", binarize, BINARIZATIONS)
    if not isinstance(device, torch.device):  # a torch.device of any kind is taken as it is
        device = resolve_device(device)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()

    data = DATASETS[name](root, download)
    # Binarize on the CPU so the fixed draws do not depend on the device.
    if binarize != "none":
        data.test_x = _binarize_with_seed(data.test_x, _TEST_BINARIZATION_SEED)
    if binarize == "static":
        data.train_x = _binarize_with_seed(data.train_x, _TRAIN_BINARIZATION_SEED)
    data.binarize = binarize
    for field in ("train_x", "train_y", "test_x", "test_y"):
        setattr(data, field, getattr(data, field).to(device))
    return data


def resolve_binarize(binarize: str | None, likelihood) -> str:
    """The binarization a run uses: ``binarize`` if given, else dynamic binarization for a
    likelihood of binary data and none otherwise.

    :param binarize: one of :data:`BINARIZATIONS` or ``None``.
    :param likelihood: a :class:`~pyro_vae.likelihoods.Likelihood` or its class.

    >>> from pyro_vae.likelihoods import Bernoulli
    >>> resolve_binarize(None, Bernoulli)
    'dynamic'
    """
    if binarize is not None:
        return binarize
    return "dynamic" if likelihood.support is constraints.boolean else "none"


def select_split(dataset: Dataset, split: str) -> Tensor:
    """The rows of one split, binarized as an evaluation needs them.

    A dynamically binarized data set keeps grey levels in ``train_x``; they are binarized here
    with a private generator seeded with :data:`TRAIN_EVALUATION_SEED` (on the CPU, so the
    images do not depend on the device), and every evaluation sees the same binary images.

    :param Dataset dataset: from :func:`load_dataset`.
    :param str split: one of :data:`SPLITS`.
    :returns: the ``(N, data_dim)`` data, on the data set's device.
    """
    check_choice("split", split, SPLITS)
    if split == "test":
        return dataset.test_x
    x = dataset.train_x
    if dataset.binarize == "dynamic":
        x = _binarize_with_seed(x.cpu(), TRAIN_EVALUATION_SEED).to(x.device)
    return x


def validation_rows(num_rows: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Which rows of a training split stay for training and which ``size`` are held out.

    The rows are drawn by a random permutation from a private generator seeded with ``seed``
    (on the CPU, never the global RNG), so the same ``size`` and ``seed`` hold out the same rows
    in every run.

    :param int num_rows: rows of the training split.
    :param int size: rows to hold out, from 0 to ``num_rows - 1``.
    :param int seed: seed of the draw.
    :returns: the training rows and the held-out rows, each sorted (CPU ``long`` tensors).
    :raises ValueError: if ``size`` is not an integer in ``[0, num_rows - 1]``.

    >>> train, valid = validation_rows(10, 3, seed=0)
    >>> len(train), len(valid)
    (7, 3)
    """
    check_int("validation_size", size, minimum=0, maximum=num_rows - 1)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def split_validation(dataset: Dataset, size: int, seed: int = 0) -> tuple[Dataset, Tensor | None]:
    """Hold out ``size`` training images (see :func:`validation_rows`) as a validation set.

    The held-out images are evaluated like the test images: a dynamically binarized data set
    binarizes them once, with the fixed seed :data:`VALIDATION_BINARIZATION_SEED`.

    :param Dataset dataset: from :func:`load_dataset`.
    :param int size: images to hold out; 0 returns ``dataset`` itself and ``None``.
    :param int seed: seed of the choice of images.
    :returns: the data set without the held-out images, and the ``(size, data_dim)``
        held-out images (on the data set's device).
    """
    if size == 0:
        return dataset, None
    train_rows, valid_rows = validation_rows(dataset.train_x.shape[0], size, seed)
    x, y = dataset.train_x, dataset.train_y
    valid_x = x[valid_rows.to(x.device)]
    if dataset.binarize == "dynamic":
        valid_x = _binarize_with_seed(valid_x.cpu(), VALIDATION_BINARIZATION_SEED).to(x.device)
    rows = train_rows.to(x.device)
    return dataclasses.replace(dataset, train_x=x[rows], train_y=y[rows.to(y.device)]), valid_x


def iterate_batches(
    x: Tensor, batch_size: int, shuffle: bool = True, binarize: bool = False
) -> Iterator[Tensor]:
    """Yield one epoch of mini-batches of the rows of ``x``.

    Shuffling uses ``torch.randperm`` on ``x.device`` and dynamic binarization uses
    :func:`bernoulli_draw`, both from the global RNG, so ``torch.manual_seed`` makes an epoch
    reproducible. The last batch is smaller when ``batch_size`` does not divide ``len(x)``.
    Arguments are checked when called, not at the first batch.

    :param Tensor x: data of shape ``(N, ...)``.
    :param int batch_size: rows per batch, between 1 and ``N``.
    :param bool shuffle: visit the rows in a fresh random order.
    :param bool binarize: draw ``Bernoulli(batch)`` per batch (dynamic binarization);
        ``x`` must then be in ``[0, 1]``.
    :returns: an iterator over batches that together hold every row exactly once.
    :rtype: Iterator[Tensor]
    :raises TypeError: ``x`` is not a tensor with a batch dim.
    :raises ValueError: ``x`` is empty or ``batch_size`` is not an integer in ``[1, N]``.

    >>> [b.shape[0] for b in iterate_batches(torch.zeros(10, 3), 4)]
    [4, 4, 2]
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a tensor of shape (N, ...), got {got}")
    num_rows = x.shape[0]
    if num_rows == 0:
        raise ValueError("cannot make batches of an empty tensor (x has 0 rows)")
    batch_size = check_int("batch_size", batch_size, maximum=num_rows)
    return _generate_batches(x, batch_size, shuffle, binarize)


def check_finite(x: Tensor, name: str = "x") -> None:
    """Raise if ``x`` holds NaN or infinite values.

    :param Tensor x: data of shape ``(N, ...)``.
    :param str name: how to call ``x`` in the error message.
    :raises ValueError: naming how many values are not finite and the first rows holding them.
    """
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    num_bad = int(bad.sum())
    rows = bad.reshape(x.shape[0], -1).any(-1).nonzero().squeeze(-1) if x.dim() else None
    where = "" if rows is None else f" in {rows.numel()} rows, first rows {rows[:5].tolist()}"
    raise ValueError(
        f"{name} has {num_bad} non-finite values (NaN or Inf){where}; clean or drop them"
    )


def _generate_batches(
    x: Tensor, batch_size: int, shuffle: bool, binarize: bool
) -> Iterator[Tensor]:
    num_rows = x.shape[0]
    order = torch.randperm(num_rows, device=x.device) if shuffle else None
    for start in range(0, num_rows, batch_size):
        if order is None:
            batch = x[start : start + batch_size]
        else:
            batch = x[order[start : start + batch_size]]
        yield bernoulli_draw(batch) if binarize else batch


def bernoulli_draw(p: Tensor) -> Tensor:
    """``x ~ Bernoulli(p)`` elementwise, as ``U < p`` with ``U ~ Uniform[0, 1)``: the same
    distribution as :func:`torch.bernoulli` (to float rounding), from a faster kernel on CPU."""
    return (torch.rand_like(p) < p).to(p.dtype)


def _binarize_with_seed(x: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def _load_digits(root: Path, download: bool = True) -> Dataset:
    """scikit-learn's 1797 real 8x8 digits (bundled, no download), 1497 train / 300 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # numpy's legacy RandomState is frozen across versions, so the split never drifts.
    order = np.random.RandomState(_DIGITS_SPLIT_SEED).permutation(len(digits.target))
    test_idx, train_idx = order[:_DIGITS_NUM_TEST], order[_DIGITS_NUM_TEST:]
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return Dataset("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], (8, 8))


def _load_mnist(root: Path, download: bool = True) -> Dataset:
    """MNIST (LeCun et al. 1998), 60000 train / 10000 test 28x28 digits."""
    return _load_idx_dataset("mnist", "MNIST", root, download)


def _load_fashion_mnist(root: Path, download: bool = True) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017), 60000 train / 10000 test 28x28 clothing images."""
    return _load_idx_dataset("fashion-mnist", "FashionMNIST", root, download)


def _load_idx_dataset(name: str, class_name: str, root: Path, download: bool = True) -> Dataset:
    import torchvision.datasets  # slow import, only needed here

    cls = getattr(torchvision.datasets, class_name)
    raw_dir = root / class_name / "raw"
    _check_idx_files(raw_dir)
    missing = [f for f in _IDX_FILES if not (raw_dir / f).exists()]
    if missing and not download:
        reason = "downloading is off (the folder was read from a run's config.json)"
        raise FileNotFoundError(_missing_files_message(cls, raw_dir, missing, reason))
    if missing:
        _download(cls, root, raw_dir, missing)
    train, test = (cls(root=root, train=split, download=False) for split in (True, False))
    return Dataset(
        name,
        _flatten(train.data),
        train.targets.long(),
        _flatten(test.data),
        test.targets.long(),
        (28, 28),
    )


def _flatten(images: Tensor) -> Tensor:
    """uint8 ``(N, H, W)`` -> float32 ``(N, H * W)`` in ``[0, 1]``."""
    return images.reshape(len(images), -1).float().div_(255.0)


def _download(cls: type, root: Path, raw_dir: Path, missing: list[str]) -> None:
    """Fetch the idx files with torchvision; any failure becomes one clear FileNotFoundError."""
    logger.info("%s files %s missing in %s; downloading them", cls.__name__, missing, raw_dir)
    try:
        cls(root=root, train=True, download=True)
    except Exception as err:  # torchvision raises many types (URLError, RuntimeError, ...)
        reason = f"the download failed ({type(err).__name__}: {' '.join(str(err).split())})"
        raise FileNotFoundError(_missing_files_message(cls, raw_dir, missing, reason)) from err
    _check_idx_files(raw_dir)
    still_missing = [f for f in _IDX_FILES if not (raw_dir / f).exists()]
    if still_missing:
        reason = f"the download left {still_missing} missing"
        raise FileNotFoundError(_missing_files_message(cls, raw_dir, missing, reason))


def _missing_files_message(cls: type, raw_dir: Path, missing: list[str], reason: str) -> str:
    lacking = (
        f"no {cls.__name__} files" if len(missing) == len(_IDX_FILES) else f"{missing} missing"
    )
    return (
        f"{lacking} in {raw_dir} and {reason[:300]}; "
        f"put the 4 uncompressed files {list(_IDX_FILES)} there (download the .gz files "
        f"from {cls.mirrors[0]} and gunzip them, or copy them from another machine), or pass "
        f"config.data_dir / set PYRO_VAE_DATA to a directory holding {cls.__name__}/raw/"
    )


def _check_idx_files(raw_dir: Path) -> None:
    """Check size and magic number of every idx file present, before torchvision parses them."""
    for file_name, (magic, size) in _IDX_FILES.items():
        path = raw_dir / file_name
        if not path.exists():
            continue
        actual_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
        fix = "delete it and run again to re-download it, or copy an intact file there"
        if head[:2] == _GZIP_MAGIC:
            raise ValueError(f"{path} is gzip-compressed; gunzip it in place (keep the name)")
        if actual_size != size:
            raise ValueError(
                f"{path} is {actual_size} bytes but an intact {file_name} is {size} bytes "
                f"(truncated or corrupt download); {fix}"
            )
        if int.from_bytes(head, "big") != magic:
            raise ValueError(
                f"{path} starts with magic number {int.from_bytes(head, 'big')} but an idx "
                f"{'image' if magic == _IDX_IMAGES_MAGIC else 'label'} file starts with "
                f"{magic} (corrupt file); {fix}"
            )


DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
}
