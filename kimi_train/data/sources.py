"""Where the text comes from: the Python standard library (built in), local files, or the HF hub.

Each source yields documents (strings) in a fixed order until ``max_bytes`` of UTF-8
text have been read (0 = no cap), so the same config always gives the same corpus.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from kimi_train.data.errors import DataError, require

SOURCES = ("stdlib", "files", "hub")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FILE_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                  ".parquet": "parquet"}


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The running interpreter's standard-library .py files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _capped(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for doc in docs:
        if not doc:
            continue
        yield doc
        total += len(doc.encode("utf-8"))
        if max_bytes and total >= max_bytes:
            return


def _stdlib_docs() -> Iterator[str]:
    for path in stdlib_files():
        yield path.read_text(encoding="utf-8", errors="replace")


def _builder_for(paths: list[str]) -> str:
    kinds = set()
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise DataError(f"data.paths: {p!r} has no known format (valid: {', '.join(sorted(_FILE_BUILDERS))})")
        kinds.add(_FILE_BUILDERS[suffix])
    if len(kinds) != 1:
        raise DataError(f"data.paths mixes formats {sorted(kinds)}; use files of one format")
    return kinds.pop()


def checked_files(paths: list[str]) -> list[Path]:
    """data.paths as resolved Paths, each an existing, readable, non-empty file (else a DataError)."""
    if not paths:
        raise DataError("data.paths=[] is empty; data.source=files needs a list of local files")
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"data.paths: {str(p)!r} does not exist")
        if not path.is_file():
            raise DataError(f"data.paths: {str(p)!r} is not a file (a directory? list its files)")
        if not os.access(path, os.R_OK):
            raise DataError(f"data.paths: {str(p)!r} is not readable (permission denied)")
        if path.stat().st_size == 0:
            raise DataError(f"data.paths: {str(p)!r} is empty")
        files.append(path.resolve())
    return files


def _dataset_docs(dataset, text_field: str, where: str) -> Iterator[str]:
    for row in dataset:
        if text_field not in row:
            raise DataError(f"data.text_field={text_field!r} is not a column of {where} (columns: {sorted(row)})")
        yield row[text_field]


@contextmanager
def _quiet_datasets():
    """datasets logs a parse error on stderr before raising it; the raised one is enough."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _file_docs(paths: list[str], files: list[Path], text_field: str) -> Iterator[str]:
    load_dataset = require("datasets", "data.source=files").load_dataset
    import pyarrow

    builder = _builder_for(paths)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    field = "text" if builder == "text" else text_field
    try:
        with _quiet_datasets():
            # Streaming reads the files in order without writing an Arrow cache.
            ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
            yield from _dataset_docs(ds, field, f"{paths}")
    except UnicodeDecodeError as e:
        raise DataError(f"data.paths={paths}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except pyarrow.ArrowInvalid as e:
        raise DataError(f"data.paths={paths}: not valid {builder} ({str(e).splitlines()[0]})") from None


def _hub_docs(name: str, subset: Optional[str], split: str, text_field: str) -> Iterator[str]:
    datasets = require("datasets", "data.source=hub")
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=True)
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as e:
        raise DataError(f"data.name={name!r}: {str(e).splitlines()[0]}") from None
    yield from _dataset_docs(ds, text_field, name)


def iter_documents(data_cfg) -> Iterator[str]:
    """Documents of the configured source, in a deterministic order, capped at data.max_bytes.

    Local files are checked here (exist, readable, not empty), before any is read.
    """
    if data_cfg.source == "stdlib":
        docs = _stdlib_docs()
    elif data_cfg.source == "files":
        paths = list(data_cfg.paths)
        docs = _file_docs(paths, checked_files(paths), data_cfg.text_field)
    elif data_cfg.source == "hub":
        docs = _hub_docs(data_cfg.name, data_cfg.subset, data_cfg.split, data_cfg.text_field)
    else:
        raise DataError(f"data.source={data_cfg.source!r} is not one of {', '.join(SOURCES)}")
    return _capped(docs, data_cfg.max_bytes)


def _file_stamp(path: Path) -> str:
    path = path.expanduser().resolve()
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def describe_source(data_cfg) -> str:
    """A stable description of the corpus, used as a cache key."""
    import sys

    if data_cfg.source == "stdlib":
        what = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}-{sysconfig.get_paths()['stdlib']}"
    elif data_cfg.source == "files":
        what = "files-" + ",".join(_file_stamp(p) for p in checked_files(list(data_cfg.paths)))
        what += f"-{data_cfg.text_field}"
    else:
        what = f"hub-{data_cfg.name}-{data_cfg.subset}-{data_cfg.split}-{data_cfg.text_field}"
        local = Path(str(data_cfg.name)).expanduser()
        if local.is_dir():  # a local dataset repository: editing its files must change the key
            what += "-" + ",".join(_file_stamp(f) for f in sorted(local.rglob("*")) if f.is_file())
    return f"{what}-max{data_cfg.max_bytes}"
