"""fit-final --resume continues a final model only with the config it started with."""

from __future__ import annotations

from pathlib import Path

import pytest

from skinlesion.core.config import load_config, save_config
from skinlesion.core.errors import ConfigError, OutputError
from skinlesion.training.final import check_final_resume


@pytest.fixture
def started(tmp_path: Path) -> Path:
    """``final/`` of a fit interrupted after an epoch: its config (3 epochs) and training state."""
    out = tmp_path / "final"
    out.mkdir()
    save_config(load_config(None, ["train.epochs=3"]), out / "config.yaml")
    (out / "last.pt").write_bytes(b"state")
    return out


def test_resume_refuses_a_moved_epoch_count(started: Path) -> None:
    # More folds finished since the fit started: their median best epoch is now 4.
    with pytest.raises(ConfigError, match=r"train\.epochs: 3 -> 4 \(train\.epochs is the median"):
        check_final_resume(started, load_config(None, ["train.epochs=4"]), resume=True)


def test_resume_accepts_machine_settings(started: Path) -> None:
    check_final_resume(started, load_config(None, ["train.epochs=3", "train.num_threads=1"]), True)


def test_a_finished_final_model_needs_resume(started: Path) -> None:
    (started / "best.pt").write_bytes(b"model")
    with pytest.raises(OutputError, match="best.pt exists; pass --resume"):
        check_final_resume(started, load_config(None, ["train.epochs=3"]), resume=False)


def test_resume_without_a_started_final_fit_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "final"
    with pytest.raises(ConfigError, match=f"{out} does not exist, so there is no final fit"):
        check_final_resume(out, load_config(None, ["train.epochs=3"]), resume=True)
    check_final_resume(out, load_config(None, ["train.epochs=3"]), resume=False)
