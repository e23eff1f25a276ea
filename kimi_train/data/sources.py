"""Where the text comes from: the Python standard library (built in), local files, or the HF hub.

Each source yields blocks of documents in a fixed order (`iter_blocks`); `kimi-train-prepare`
tokenizes the blocks in a worker pool and stops after ``max_bytes`` of UTF-8 text (0 = no cap),
so the same config always gives the same corpus. Local files are read here, streaming, without
an Arrow cache: .txt/.md (one document per file), .json/.jsonl(.gz) (one record per line, or one
array), .parquet; a directory stands for its files of those formats, sorted.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from kimi_train.data.errors import DataError, require

SOURCES = ("stdlib", "files", "hub", "prepared")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "jsonl", ".jsonl": "jsonl",
            ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet"}
BLOCK_BYTES = 1 << 20  # text per work unit of the prepare workers
Block = tuple  # ("docs", [text, ...], "") | ("jsonl", raw lines, text_field + "\0" + path)


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The running interpreter's standard-library .py files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # pruned, not walked (site-packages is large)
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
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


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(f"data.paths: {str(path)!r} has no known format (valid: {', '.join(_FORMATS)})")


def checked_files(paths: list[str]) -> list[Path]:
    """data.paths as resolved files (a directory: its files of known formats, sorted), each existing,
    readable and non-empty (else a DataError)."""
    if not paths:
        raise DataError("data.paths=[] is empty; data.source=files needs a list of local files or directories")
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"data.paths: {str(p)!r} does not exist")
        if path.is_dir():
            inside = sorted(f for f in path.rglob("*") if f.is_file() and any(f.name.lower().endswith(s) for s in _FORMATS))
            if not inside:
                raise DataError(f"data.paths: directory {str(p)!r} has no files of a known format "
                                f"({', '.join(_FORMATS)})")
            files.extend(f.resolve() for f in inside)
            continue
        if not os.access(path, os.R_OK):
            raise DataError(f"data.paths: {str(p)!r} is not readable (permission denied)")
        if path.stat().st_size == 0:
            raise DataError(f"data.paths: {str(p)!r} is empty")
        _format_of(path)
        files.append(path.resolve())
    return files


def _doc_blocks(docs: Iterator[str]) -> Iterator[Block]:
    """Documents grouped into blocks of about BLOCK_BYTES of text."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BLOCK_BYTES:
            yield ("docs", batch, "")
            batch, size = [], 0
    if batch:
        yield ("docs", batch, "")


def _line_blocks(path: Path, text_field: str) -> Iterator[Block]:
    """A JSON-lines file (gzip-compressed or not) as raw blocks of whole lines: workers parse them."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        rest = b""
        while True:
            chunk = f.read(BLOCK_BYTES)
            if not chunk:
                break
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                rest = chunk
                continue
            rest = chunk[cut:]
            yield ("jsonl", chunk[:cut], text_field + "\0" + str(path))
        if rest.strip():
            yield ("jsonl", rest, text_field + "\0" + str(path))


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    require("pyarrow", "data.paths with .parquet files")
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"data.text_field={text_field!r} is not a column of {str(path)!r} (columns: {sorted(names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _file_blocks(files: list[Path], text_field: str) -> Iterator[Block]:
    for path in files:
        fmt = _format_of(path)
        if fmt == "jsonl":
            with open(path, "rb") as f:
                head = f.read(64).lstrip()
            if head.startswith(b"["):  # a .json holding one array of records
                yield from _doc_blocks(_json_array_docs(path, text_field))
            else:
                yield from _line_blocks(path, text_field)
        elif fmt == "parquet":
            yield from _doc_blocks(_parquet_docs(path, text_field))
        else:
            yield ("docs", [_read_text(path)], "")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.paths: {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_array_docs(path: Path, text_field: str) -> Iterator[str]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"data.paths: {str(path)!r} is not valid json ({e.msg} at line {e.lineno})") from None
    yield from _texts(rows, text_field, str(path))


def _texts(rows, text_field: str, where: str) -> Iterator[str]:
    for row in rows:
        if not isinstance(row, dict) or text_field not in row:
            columns = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"data.text_field={text_field!r} is not a column of {where} (columns: {columns})")
        if row[text_field]:
            yield row[text_field]


def block_documents(block: Block) -> list[str]:
    """The documents of one block (run by the prepare workers: parses JSON lines)."""
    kind, payload, extra = block
    if kind == "docs":
        return payload
    text_field, where = extra.split("\0", 1)
    try:
        rows = [json.loads(line) for line in payload.splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"data.paths: {where!r} is not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"data.paths: {where!r} is not valid json ({e.msg})") from None
    return list(_texts(rows, text_field, where))


def _hub_docs(name: str, subset: Optional[str], split: str, text_field: str) -> Iterator[str]:
    datasets = require("datasets", "data.source=hub")
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=True)
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as e:
        raise DataError(f"data.name={name!r}: {str(e).splitlines()[0]}") from None
    yield from _texts(ds, text_field, name)


def iter_blocks(data_cfg) -> Iterator[Block]:
    """The configured source as blocks of documents, in a fixed order (local files are checked first).

    A block is ("docs", [text, ...], "") or ("jsonl", raw lines, field + "\\0" + path); the prepare
    workers turn each into documents with `block_documents` (data.max_bytes is applied by the writer).
    """
    if data_cfg.source == "stdlib":
        return _doc_blocks(_stdlib_docs())
    if data_cfg.source == "files":
        return _file_blocks(checked_files(list(data_cfg.paths)), data_cfg.text_field)
    if data_cfg.source == "hub":
        return _doc_blocks(_hub_docs(data_cfg.name, data_cfg.subset, data_cfg.split, data_cfg.text_field))
    raise DataError(f"data.source={data_cfg.source!r} has no documents to read (valid: stdlib, files, hub)")


def iter_documents(data_cfg) -> Iterator[str]:
    """Documents of the configured source, in a deterministic order, capped at data.max_bytes."""
    return _capped((doc for block in iter_blocks(data_cfg) for doc in block_documents(block)), data_cfg.max_bytes)


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
