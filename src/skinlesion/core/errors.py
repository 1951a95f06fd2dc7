"""The error family for the user's faults: a bad config, data, checkpoint, download or image.

The command line prints a :class:`SkinlesionError` as its message and exits with status 2: one
line naming the culprit, or for a :class:`DataError` a title line and its faults, one a line (at
most 20, then a count of the rest); any other
exception is a bug and keeps its traceback. Each kind also derives from the built-in exception
that described it before the family existed, so ``except ValueError`` callers keep working.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_MAX_LISTED = 20


class SkinlesionError(Exception):
    """A fault of the input (config, files, data), not of the program; the message names it."""


class ConfigError(SkinlesionError, ValueError):
    """A configuration file, override or option that does not fit the schema."""


class DataError(SkinlesionError, ValueError):
    """The data on disk does not match what the pipeline expects; the message lists every fault."""

    def __init__(self, title: str, problems: Sequence[str] = ()):
        self.title = title
        self.problems = list(problems)
        if not self.problems:
            super().__init__(title)
            return
        shown = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(shown)
        text = f"{title}: {len(self.problems)} problem(s)\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


class ImageDecodeError(SkinlesionError, ValueError):
    """A file that cannot be decoded as an image; the message names the file."""


class CheckpointError(SkinlesionError, ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class DownloadError(SkinlesionError, RuntimeError):
    """A download or extraction failed; the message names the file, URL, and expected vs got."""


class WeightsUnavailableError(SkinlesionError, RuntimeError):
    """Pretrained weights were asked for and cannot be obtained."""


class OutputError(SkinlesionError):
    """An output path that cannot be written (read-only, not a folder, disk full)."""


class AddressError(SkinlesionError, OSError):
    """A host and port the service cannot listen on (in use, not an address of this machine)."""


def torch_load_problem(err: BaseException, what: str = "checkpoint") -> str:
    """One sentence for what ``torch.load(..., weights_only=True)`` raised on a ``what`` file.

    A pickle that would run code is refused by torch with paragraphs that end by suggesting
    ``weights_only=False``; keep the one fact that matters (what it tried to load).

    >>> torch_load_problem(RuntimeError("PytorchStreamReader failed. Internal error.\\nMore."))
    'not a readable checkpoint (PytorchStreamReader failed)'
    """
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        found = re.search(r"unsupported (GLOBAL \S+|operand \S+)", text, re.IGNORECASE)
        detail = f" ({found.group(1).rstrip('.')})" if found else ""
        return (
            f"refused: it holds pickled objects that could run code{detail}; skinlesion loads "
            "plain tensors and types only"
        )
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__
    return f"not a readable {what} ({first})"
