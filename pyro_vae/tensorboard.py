"""TensorBoard for long runs: every metrics column per epoch, and the run's figures.

:class:`TensorBoardLogger` writes through torch's :class:`~torch.utils.tensorboard.SummaryWriter`,
which needs the ``tensorboard`` package (``pip install "pyro-vae[tensorboard]"``). Its
:meth:`~TensorBoardLogger.on_epoch_end` is an ``on_epoch_end`` hook of
:func:`~pyro_vae.runs.train_run` and :func:`~pyro_vae.runs.resume_run`: each metrics row becomes
one scalar per column at step = epoch, so a resumed run continues its curves in the same folder.
:meth:`~TensorBoardLogger.add_figures` adds the PNG figures of a run folder as images.
``pyro-vae train --tensorboard DIR`` does both; view them with ``tensorboard --logdir DIR``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image

#: Metrics columns shown under another tag (grouped by quantity); the others keep their name.
TAGS = {
    "train_elbo": "elbo/train",
    "valid_elbo": "elbo/valid",
    "test_elbo": "elbo/test",
    "test_iwae": "iwae/test",
}


class TensorBoardLogger:
    """Write metrics rows and figures of a run to a TensorBoard log folder.

    The writer is made at the first row, so a run refused for bad input leaves no log folder.

    :param log_dir: the folder of the event files.
    :raises ImportError: if the ``tensorboard`` package is missing, saying how to install it.
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"TensorBoard logging needs the tensorboard package ({e}); install it with "
                "pip install 'pyro-vae[tensorboard]'"
            ) from None
        self.log_dir = Path(log_dir)
        self._make_writer = SummaryWriter
        self._writer = None
        self.last_epoch = 0

    @property
    def writer(self):
        """The :class:`~torch.utils.tensorboard.SummaryWriter`, made on first use."""
        if self._writer is None:
            self._writer = self._make_writer(log_dir=str(self.log_dir))
        return self._writer

    def on_epoch_end(self, row: dict) -> None:
        """Add every numeric column of a metrics row but ``epoch`` at step ``row["epoch"]``
        (a ``nan`` column, absent that epoch, is left out)."""
        epoch = int(row["epoch"])
        for name, value in row.items():
            if name == "epoch" or not isinstance(value, int | float) or math.isnan(value):
                continue
            self.writer.add_scalar(TAGS.get(name, name), value, epoch)
        self.last_epoch = epoch
        self.writer.flush()

    def add_figures(self, run_dir: str | Path, step: int | None = None) -> list[str]:
        """Add each PNG figure of ``run_dir`` as an image tagged ``figures/<name>``, at
        ``step`` (default: the last epoch logged); returns the tags, sorted."""
        step = self.last_epoch if step is None else step
        tags = []
        for path in sorted(Path(run_dir).glob("*.png")):
            image = matplotlib.image.imread(path)[..., :3]  # RGB of the RGBA that savefig writes
            tags.append(f"figures/{path.stem}")
            self.writer.add_image(tags[-1], image, step, dataformats="HWC")
        self.writer.flush()
        return tags

    def close(self) -> None:
        """Flush and close the event file (if any was written)."""
        if self._writer is not None:
            self._writer.close()
