"""Command line: each sub-command parses its arguments and calls one library function.

One module per command group (:mod:`~skinlesion.cli.data`, :mod:`~skinlesion.cli.train`,
:mod:`~skinlesion.cli.predict`, :mod:`~skinlesion.cli.serve`, :mod:`~skinlesion.cli.bench`);
this one assembles the parser and runs a command. Imports of the library happen inside the
handlers, so ``--help`` and a config error answer in about a second. A
:class:`~skinlesion.core.errors.SkinlesionError` (the user's fault) is printed as one line and
exits with 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from skinlesion.cli import bench, data, predict, serve, train

log = logging.getLogger("skinlesion")


class _Parser(argparse.ArgumentParser):
    """Options may sit between positional arguments (``train a=1 --resume b=2``)."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # The sub-command's parser is called through parse_known_args; route it through the
        # intermixed parse once (which itself calls parse_known_args, hence the flag).
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if has_sub or self._intermixed:
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="skinlesion",
        description="Train, evaluate and serve leakage-free classifiers of dermoscopic images.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    data.add_commands(sub)
    train.add_commands(sub)
    predict.add_commands(sub)
    bench.add_benchmark_parser(sub)
    serve.add_commands(sub)
    return p


def _quiet_handled_warnings() -> None:
    """Library warnings the library already reports as one log line; their own text (file,
    line, source) would only repeat it. A filter set once here, not around each call: images
    are decoded in worker threads, where ``warnings.catch_warnings`` is not safe."""
    import warnings

    from PIL import Image

    # decode_image logs an image over PIL's pixel limit (one over twice the limit is refused).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    _quiet_handled_warnings()
    from skinlesion.core.errors import SkinlesionError

    try:
        return args.func(args)
    except SkinlesionError as err:
        log.debug("user error", exc_info=True)
        print(f"skinlesion {args.command}: error: {err}", file=sys.stderr)
        return 2
