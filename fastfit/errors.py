"""Every exception fastfit raises on purpose, in one module every layer may import (it imports nothing).

User errors derive from FastfitError: the message names the thing that is wrong and the fix; the CLI prints it as
one line and exits with code 2. FastfitError derives from ValueError so callers catching ValueError keep working.
Two exceptions are not user errors: Preempted (a clean stop with a checkpoint, exit code 75) and PeerFailure (this
rank stopped because another one failed first).
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure; running the same command again continues
EXIT_PEER_FAILED = 1


class FastfitError(ValueError):
    """Bad user input; the message says what and how to fix it."""


class ConfigError(FastfitError):
    """A config file, key or value is wrong; the message names it and what is allowed."""


class DataError(FastfitError):
    """A dataset folder, file or data setting is wrong; the message names it and the fix."""


class ModelError(FastfitError):
    """A model name, weights reference or weights file is wrong."""


class TapError(FastfitError):
    """A tap path does not exist, or the tapped shapes cannot be connected."""


class CheckpointError(FastfitError):
    """A checkpoint is missing, unreadable or belongs to another config."""


class NonFiniteError(FastfitError):
    """A loss term became NaN/Inf and run.nonfinite is 'stop'."""


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint; resuming continues it exactly.

    Args:
        signal_name: the signal that asked for the stop (e.g. "SIGTERM").
        checkpoint: the checkpoint file written for this stop.
        position: where training stands (an object with stage, epoch, step and global_step).
    """

    def __init__(self, signal_name: str, checkpoint, position) -> None:
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.position = position
        super().__init__(
            f"stopped by {signal_name} after global step {position.global_step} (stage {position.stage + 1}, epoch "
            f"{position.epoch + 1}, step {position.step}); checkpoint {checkpoint}; run the same command with "
            "--resume auto to continue (torchrun --max-restarts does so automatically)"
        )


class PeerFailure(RuntimeError):
    """This rank stopped because another process of the run failed first (its error is the one to read)."""


class PeerUnresponsive(RuntimeError):
    """Another process of the run stopped answering within run.collective_timeout_s (the message names its rank)."""
