"""MANIFEST.json: every file of a checkpoint with its size and CRC-32, and the check against it.

CRC-32 (zlib) because it is the fastest checksum in the standard library (2.0 GB/s on one
core here, against 0.87 GB/s for sha256 and 0.46 GB/s for blake2b), and the damage to catch
is accidental (truncation, a flipped bit, a lost block), not tampering: it catches every
burst of up to 32 bits and misses random damage with probability 2^-32.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

from . import ranks

MANIFEST = "MANIFEST.json"
_CHUNK = 16 << 20  # bytes read per checksum update


def _crc32(path: Path) -> str:
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


def manifest(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of ``files`` (name -> file_entry), with a checksum of its own."""
    return {"files": files, "files_crc32": _files_crc32(files)}


def _files_crc32(files: dict) -> str:
    return f"{zlib.crc32(json.dumps(files, sort_keys=True).encode()):08x}"


def files_written_by(directory: Path, rank: int) -> list[Path]:
    """The files of ``directory`` this rank wrote: DCP's ``__{rank}_*`` shards and its RNG file;
    rank 0 also takes DCP's .metadata and anything else not named after a rank."""
    owned = []
    for path in directory.iterdir():
        m = re.match(r"^(?:__(\d+)_|rng_rank(\d+)\.json$)", path.name)
        owner = int(m.group(1) or m.group(2)) if m else 0
        if owner == rank and path.is_file():
            owned.append(path)
    return owned


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files; ValueError naming what is wrong with it."""
    try:
        saved = json.loads((path / MANIFEST).read_text())
        files = saved["files"]
        ok = _files_crc32(files) == saved["files_crc32"]
    except FileNotFoundError:
        raise ValueError(f"{MANIFEST} is missing")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({type(e).__name__})")
    if not ok:
        raise ValueError(f"{MANIFEST} does not match its own checksum")
    return files


def _local_problems(path: Path, checksums: bool) -> list[str]:
    """This rank's share of the verification: every file's size, and the CRC-32 of every
    world-th file (the largest first, so the ranks read about the same number of bytes)."""
    try:
        files = _read_manifest(path)
    except ValueError as e:
        return [str(e)]
    problems, present = [], []
    for name, entry in files.items():
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except OSError as e:
            problems.append(f"{name} is unreadable ({e.strerror})")
            continue
        if size != entry["bytes"]:
            cut = "truncated" if size < entry["bytes"] else "too long"
            problems.append(f"{name} has {size} bytes, the manifest says {entry['bytes']} ({cut})")
        else:
            present.append((-size, name))
    if checksums:
        for _, name in sorted(present)[ranks.rank()::ranks.world()]:
            try:
                got = _crc32(path / name)
            except OSError as e:  # e.g. EIO from a failing disk
                problems.append(f"{name} is unreadable ({e.strerror})")
                continue
            if got != files[name]["crc32"]:
                problems.append(f"{name} has CRC-32 {got}, the manifest says {files[name]['crc32']} (damaged)")
    return problems


def verify_checkpoint(path: str | Path, checksums: bool = True) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty: every file matches the manifest), the same
    list on every rank. Sizes are always checked (a stat per file); CRC-32s too unless
    ``checksums=False`` (they read the whole checkpoint once, split over the ranks). Every rank
    must call it."""
    gathered = ranks.all_gather(_local_problems(Path(path), checksums))
    return list(dict.fromkeys(p for ps in gathered for p in ps))
