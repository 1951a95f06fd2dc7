"""What several command groups share: argument types, the checked config, inference options."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("skinlesion")


class DeprecatedOption(argparse.Action):
    """An option's old spelling: stores into the new option's ``dest``, with a warning that
    names the new spelling (``new=`` when the option is added)."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        text = f"{option_string} is deprecated; use {self.new}"
        warnings.warn(text, DeprecationWarning, stacklevel=2)
        log.warning("%s", text)
        setattr(namespace, self.dest, values)


def load_checked_config(args: argparse.Namespace) -> Any:
    """The config with every name checked, before the heavy imports of training."""
    from skinlesion.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    from skinlesion.training.checks import check_config

    check_config(cfg)
    return cfg


def run_n_boot(run_dir: str, given: int | None) -> int:
    """``--n-boot`` if given, else the run's own ``eval.n_boot`` (so a report reproduces)."""
    if given is not None:
        return given
    from skinlesion.core.run_folder import RunFolder, saved_eval_settings

    run = RunFolder(Path(run_dir))
    return saved_eval_settings(run.read_config_tree(), str(run.config)).n_boot


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        from skinlesion.core.errors import ConfigError

        raise ConfigError(f"--where '{text}' is not COLUMN=VALUE")
    return key, value


def int_at_least(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


MODEL_HELP = (
    "packaged model name (see `skinlesion models`), packaged folder, run folder (fold ensemble), "
    "checkpoint, or `skinlesion export` folder (its ONNX graph; explain and export: the model it "
    "was exported from); default: the default packaged model"
)


def add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--tta",
        type=int_at_least(1, 8),
        default=None,
        help="test-time views, 1..8 (default: the run's eval.tta)",
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=32,
        help="images per forward pass (default 32); a smaller batch needs less memory",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default auto: CUDA when there is a device, else the CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx", "onnx-int8"),
        default="auto",
        help="engine of the forward pass; auto: onnxruntime on a CPU (the model's graph, "
        "exported once into $SKINLESION_CACHE), PyTorch on CUDA; onnx-int8: the graph of "
        "`skinlesion export --int8`; with --model an export folder, that graph",
    )


def add_detail_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detail",
        default="model",
        metavar="SETTING",
        help="the detail a larger image is reduced to before the model's resize: model (the "
        "training images' detail stored with the model, if any), off (images as they come), or "
        "SIDE[:JPEG_QUALITY], e.g. 200:75",
    )
