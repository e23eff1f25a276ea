"""The data problems a user can fix, as one-line `UserError`s (exit 2 from `kimi-train`).

`DataError` is also a ValueError, like config.ConfigError, so code that catches ValueError
around the data pipeline keeps working. `require` turns a missing optional package into one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kimi_train.errors import UserError

# The extra of pyproject.toml that installs each optional package.
EXTRAS = {"datasets": "data", "pyarrow": "data", "tokenizers": "data", "transformers": "hf"}


class DataError(UserError, ValueError):
    """A data problem: a path, a file, a column, a tokenizer. One line naming the value."""


def require(module: str, needed_for: str) -> ModuleType:
    """``import module``, or a DataError saying what needs it and how to install it.

    Only the package itself being absent counts; an ImportError from inside an installed
    package is a broken install and keeps its traceback.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        extra = EXTRAS.get(module)
        hint = f"pip install 'kimi-train[{extra}]'" if extra else f"pip install {module}"
        raise DataError(f"{needed_for} needs the {module!r} package, which is not installed; {hint}") from None
