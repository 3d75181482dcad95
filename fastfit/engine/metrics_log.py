"""The run's metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard, written by rank 0.

Every record carries `global_step`. Resuming from a checkpoint drops the lines a later, killed run wrote after it
(and a line torn by the kill), so the resumed run's lines follow on exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILE_NAME = "metrics.jsonl"


class MetricsLog:
    """Append-only metrics of one run folder; on ranks other than 0 every call does nothing.

    Args:
        folder: the run folder (run.output_dir).
        enabled: whether this process writes (rank 0).
        tensorboard: also write scalars to `folder/tensorboard` (skipped with a note when TensorBoard is missing).
    """

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = Path(folder) / FILE_NAME
        self.enabled = enabled
        self._tensorboard = tensorboard and enabled
        self._writer = None

    def open(self) -> None:
        """Start the TensorBoard writer (on the first record it would otherwise be opened lazily)."""
        if not self._tensorboard or self._writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("TensorBoard is not installed: metrics go to %s only (pip install tensorboard)", self.path)
            self._tensorboard = False
            return
        self._writer = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def emit(self, record: dict[str, Any]) -> None:
        """Append `record` (it must hold `global_step`; a `stage` names the TensorBoard group)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.open()
        if self._writer is not None:
            group = record.get("stage", "run")
            for key, value in record.items():
                if isinstance(value, float):
                    self._writer.add_scalar(f"{group}/{key}", value, record["global_step"])

    def truncate_after(self, global_step: int) -> None:
        """Drop lines written after `global_step` and lines that are not JSON (torn by a kill)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= global_step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line).get("global_step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
