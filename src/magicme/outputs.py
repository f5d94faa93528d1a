"""Output safety: a command replaces only what it wrote itself, never an input, and never leaves a mix.

- `check_output` runs before any work: the parent folder exists and is writable, the path is not the
  current folder (or above it), not an input (resolved, symlinks too) and does not hold or sit inside
  one, has the kind that is meant (file or folder), and, if it exists, was written by magicme: its run
  record beside it (`clip.mp4.json`) or a marker inside it says so (`owned`).
- `atomic_file` / `atomic_folder` write under a hidden temporary name beside the destination and rename
  it into place. A folder is replaced by rename-then-delete (old aside, new in, old removed), so a kill
  at any moment leaves the old or the new one. Hidden leftovers of killed runs (`.magicme-tmp.*`,
  `.magicme-old.*`, with the dead process's id) are removed, or an old folder put back, on the next
  write of that output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

TEMP_PREFIX = ".magicme-"
_LEFTOVER = re.compile(r"\.magicme-(tmp|old)\.(\d+)\.[0-9a-f]{8}\.(.+)", re.S)


def sidecar_path(path: str | Path) -> Path:
    """The run record of an output: `clip.mp4` → `clip.mp4.json`, folder `frames` → `frames.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def has_own_record(path: str | Path) -> bool:
    """True when the run record beside `path` is one magicme wrote for it (a JSON object naming it)."""
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("output") == Path(path).name and "created" in record


def writing_marker(path: str | Path) -> Path:
    """The hidden marker beside an output that a write of it is under way (or was cut short)."""
    path = Path(path)
    return _parent(path) / f"{TEMP_PREFIX}writing.{path.name}"


def written_by_magicme(path: str | Path) -> bool:
    """The default test of `check_output`: the output's own run record, or our marker of a write cut short."""
    return has_own_record(path) or writing_marker(path).is_file()


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """Around the write of an output and then its run record: the marker first and the old record removed,
    so a record never describes another output than the one beside it. A failed or killed write leaves the
    marker, and the output stays magicme's to replace; success removes it."""
    path = Path(path)
    marker = writing_marker(path)
    marker.touch()
    sidecar_path(path).unlink(missing_ok=True)
    yield path
    marker.unlink(missing_ok=True)


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(folder: str | Path, arg: str, shown: str | Path) -> None:
    """Refuse a folder we cannot create files in, before any work (a probe file: root ignores permission bits)."""
    folder = Path(folder)
    probe = folder / f"{TEMP_PREFIX}probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{arg} {str(shown)!r}: folder {str(folder)!r} is not writable ({e.strerror or e})") from None


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    """One file or folder, by resolved path or (hard links) by inode."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(path: str | Path, inputs: Iterable[tuple[str, str | Path]], arg: str = "--out") -> None:
    """Refuse an output that is an input, holds one, or lies inside one (resolved paths, symlinks, hard links)."""
    out = _real(path)
    for name, value in inputs:
        if value is None:
            continue
        src = _real(value)
        if _same(Path(path), Path(value)):
            raise ValueError(f"{arg} {str(path)!r} is the input {name} {str(value)!r}; write to another name")
        if out in src.parents:
            raise ValueError(f"{arg} {str(path)!r} holds the input {name} {str(value)!r}; write to a folder outside it")
        if src in out.parents:
            raise ValueError(f"{arg} {str(path)!r} lies inside the input {name} {str(value)!r}; write outside it")


def check_output(
    path: str | Path,
    *,
    arg: str = "--out",
    folder: bool = False,
    owned: Callable[[Path], bool] = written_by_magicme,
    inputs: Iterable[tuple[str, str | Path]] = (),
    record: bool = True,
) -> Path:
    """Validate an output path before any work (see the module docstring); return it as a Path.

    `folder`: the output is a folder (else a file). `owned(path)` says whether an existing output is one
    magicme wrote (default: its run record names it, see `written_by_magicme`). `record`: a run record is
    written beside it too.
    """
    path = Path(path)
    parent = _parent(path)
    if not parent.is_dir():
        raise FileNotFoundError(f"{arg} {str(path)!r}: folder {str(parent)!r} does not exist")
    cwd = _real(Path.cwd())
    if _real(path) == cwd or _real(path) in cwd.parents:
        raise ValueError(f"{arg} {str(path)!r} is the current folder or one above it; name a new {'folder' if folder else 'file'}")
    outputs = [path, sidecar_path(path)] if record else [path]
    inputs = list(inputs)
    for p in outputs:
        check_not_input(p, inputs, arg)
    if os.path.lexists(path):
        if path.is_symlink():
            raise FileExistsError(f"{arg} {str(path)!r} is a symbolic link; name a new {'folder' if folder else 'file'}")
        if folder and not path.is_dir():
            raise FileExistsError(f"{arg} {str(path)!r} is a file, but a folder is written here; name a new folder")
        if not folder and path.is_dir():
            raise FileExistsError(f"{arg} {str(path)!r} is a folder, but a file is written here; name a new file")
        if not owned(path) and not (folder and not any(path.iterdir())):  # an empty folder holds nothing to lose
            raise FileExistsError(
                f"{arg} {str(path)!r} exists and magicme did not write it (no run record of its own); "
                "name a new output, or move that one away"
            )
    side = sidecar_path(path)
    if record and os.path.lexists(side) and not has_own_record(path) and not writing_marker(path).is_file():
        raise FileExistsError(f"{arg} {str(path)!r}: {str(side)!r} exists and is not magicme's run record of it; move it away")
    check_writable(parent, arg, path)
    return path


# ---- writing under a hidden name, then renaming into place ----


def temp_path(dest: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `dest` that says whose it is: `.magicme-tmp.<pid>.<random>.<name>`."""
    return dest.parent / f"{TEMP_PREFIX}{kind}.{os.getpid()}.{secrets.token_hex(4)}.{dest.name}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap liveness test: leave them rather than break a running write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def leftovers(dest: str | Path) -> list[Path]:
    """Hidden temporaries of `dest` left by processes that no longer run."""
    dest = Path(dest)
    parent = _parent(dest)
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        m = _LEFTOVER.fullmatch(entry.name)
        if m and m[3] == dest.name and not _alive(int(m[2])):
            found.append(entry)
    return found


def clean_leftovers(dest: str | Path) -> None:
    """Remove the leftovers of killed writes of `dest`; if a kill came between moving the old folder aside
    and renaming the new one in, put the old one back first (so `dest` holds the old or the new, never a mix)."""
    dest = Path(dest)
    found = leftovers(dest)
    olds = [p for p in found if p.name.startswith(f"{TEMP_PREFIX}old.")]
    if olds and not os.path.lexists(dest):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, dest)
        found.remove(newest)
    for p in found:
        _remove(p)


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename-then-delete: the old folder aside, the new one in, then the old one removed."""
    if not os.path.lexists(dest):
        os.replace(tmp, dest)
        return
    old = temp_path(dest, "old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    _remove(old)


@contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `dest` (same suffix) to write; on success it replaces `dest`."""
    dest = Path(dest)
    clean_leftovers(dest)
    tmp = temp_path(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_folder(dest: str | Path) -> Iterator[Path]:
    """Yield a new hidden folder beside `dest` to fill; on success it takes `dest`'s place (rename-then-delete)."""
    dest = Path(dest)
    clean_leftovers(dest)
    tmp = temp_path(dest)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def write_text(dest: str | Path, text: str) -> Path:
    """Write a text file atomically (flushed to disk before it takes the name)."""
    dest = Path(dest)
    with atomic_file(dest) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return dest
