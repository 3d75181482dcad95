"""What a user sees in the terminal: the one log handler of every entry point (the CLI and scripts/ install it).

Library modules only call `logging.getLogger(__name__)`; this module decides where records go. Progress bars are
tqdm's, so records are written through `tqdm.write` and never tear a bar. Under torchrun, rank 0 speaks for the
run: other ranks keep only warnings and errors, prefixed with their rank.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

_HANDLER_NAME = "fastfit-console"


class RankFilter(logging.Filter):
    """Rank 0 passes everything; other ranks pass warnings and errors, prefixed with `[rank N]`."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        record.rank_prefix = f"[rank {self.rank}] "
        return record.levelno >= logging.WARNING


class TqdmHandler(logging.Handler):
    """Writes each record to stdout above any live tqdm bar. Stderr is left to the CLI's one-line error message
    (fastfit.cli), so a failed command's stderr is exactly that line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a handler must never raise into the code that logged
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{getattr(record, 'rank_prefix', '')}{level}{text}"


def setup_logging(level: int = logging.INFO) -> None:
    """Install the console handler on the `fastfit` logger (idempotent; the rank comes from torchrun's RANK)."""
    root = logging.getLogger("fastfit")
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = TqdmHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter())
    handler.addFilter(RankFilter(_rank()))
    root.addHandler(handler)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:  # fastfit.dist names a bad RANK when the run starts; the console just assumes rank 0
        return 0
