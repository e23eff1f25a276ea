"""The exceptions `kimi-train` turns into exit codes (kimi_train/train.py:main).

    UserError       a user-caused problem (a config value, a path, a permission, data, a run
                    directory that does not match the config): ONE line naming the value and
                    what would be valid; exit 2, no traceback (KIMI_TRAIN_DEBUG=1 shows it)
    TrainingError   training cannot go on (e.g. too many non-finite steps): one line, exit 1
    Interrupted     SIGINT / SIGTERM: the run saved a checkpoint and stopped; exit 130 / 143

A bug is none of these and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the value."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps); the message says why."""


class Interrupted(Exception):
    """The run stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
