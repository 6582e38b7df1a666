"""TensorBoard logging: every metrics column per epoch as in metrics.csv, the figures, and a
resumed run continuing its curves."""

import builtins
import math

import pytest
from common import TINY_TRAIN
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pyro_vae.cli import main
from pyro_vae.runs import read_metrics
from pyro_vae.tensorboard import TAGS, TensorBoardLogger


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_train_logs_every_column_per_epoch_and_the_figures_and_resume_continues(tmp_path):
    out, board = tmp_path / "run", tmp_path / "board"
    argv = ["train", *TINY_TRAIN, "--validation-size", "100", "--out", str(out)]
    assert main([*argv, "--tensorboard", str(board)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "3", "--tensorboard", str(board)]) == 0
    events = read_events(board)
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for column in ("train_elbo", "valid_elbo", "test_elbo", "lr", "kl_scale", "seconds"):
        scalars = events.Scalars(TAGS.get(column, column))
        assert [s.step for s in scalars] == [1, 2, 3]  # the resumed epoch follows on
        assert [s.value for s in scalars] == pytest.approx([row[column] for row in rows])
    assert "epoch" not in events.Tags()["scalars"] and "step" in events.Tags()["scalars"]
    figures = sorted(f"figures/{p.stem}" for p in out.glob("*.png"))
    assert figures and sorted(events.Tags()["images"]) == figures
    image = events.Images(figures[0])
    assert [i.step for i in image] == [2, 3]  # after the first training and after the resume
    assert image[-1].width > 100 and image[-1].height > 100


def test_a_nan_column_is_left_out_and_nothing_is_written_before_the_first_row(tmp_path):
    logger = TensorBoardLogger(tmp_path / "board")
    assert not (tmp_path / "board").exists()  # a refused run leaves no log folder
    logger.on_epoch_end({"epoch": 1, "train_elbo": -90.0, "valid_elbo": math.nan})
    logger.close()
    tags = read_events(tmp_path / "board").Tags()["scalars"]
    assert tags == ["elbo/train"]


def test_missing_tensorboard_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ModuleNotFoundError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ImportError, match=r"pip install 'pyro-vae\[tensorboard\]'"):
        TensorBoardLogger("board")
