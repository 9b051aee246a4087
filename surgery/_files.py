"""Writing files safely: atomic replacement, no stale temporaries, never over one's own inputs.

Every file the library or the ``surgery`` command writes goes through :func:`atomic_write`: the data is
written to a temporary file next to the target (``.<name>.<pid>-<token>.tmp``) and renamed over it, so
the target is either left as it was or replaced by a complete file, even when the process is killed.
A process killed mid-write leaves its temporary file behind; the next write to the same target removes
the temporaries of processes that no longer run (those of running processes are left alone, so two
writers of one cache file do not disturb each other).

:func:`refuse_overwrite` is the one check that an output is none of a command's inputs (also through
``./``, symlinks and hard links).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

__all__ = [
    "atomic_write",
    "write_text",
    "save_figure",
    "remove_stale_temporaries",
    "refuse_overwrite",
    "PathLike",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.tmp$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-z_]{6,16}\.tmp$")  # before the pid was in the name
_LEGACY_AGE_S = 3600.0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: PathLike) -> int:
    """Remove the temporary files of interrupted writes of ``path``; returns how many were removed.

    A temporary is stale when the process that created it no longer runs (or, for temporaries named
    before the writer's pid was part of the name, when it is more than an hour old).
    """
    target = Path(path)
    folder = target.parent
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    now = time.time()
    for entry in entries:
        m = _TMP.match(entry.name)
        stale = False
        if m is not None and m["name"] == target.name:
            stale = not _alive(int(m["pid"]))
        else:
            m = _LEGACY_TMP.match(entry.name)
            if m is not None and m["name"] == target.name:
                try:
                    stale = now - entry.stat().st_mtime > _LEGACY_AGE_S
                except OSError:
                    continue
        if stale:
            try:
                os.unlink(entry.path)
                removed += 1
                logger.info("removed %s, left by an interrupted write of %s", entry.path, target)
            except OSError:
                pass
    return removed


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a new temporary file next to ``path``, then rename it to ``path``.

    The temporary is created with the usual permissions (``0o666`` less the umask) and removed if
    ``write`` fails; stale temporaries of earlier interrupted writes of ``path`` are removed first.
    Missing parent folders are created. Returns ``path``.

    Raises:
        SurgeryError: the folder cannot be created or written (the message names the path).
    """
    target = Path(path).expanduser()
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurgeryError(f"cannot create the folder of {str(target)!r}: {e}") from None
    if target.is_dir():
        raise SurgeryError(f"{str(target)!r} is a folder; give a file name to write to")
    remove_stale_temporaries(target)
    tmp: Path | None = None
    for _ in range(100):
        candidate = folder / f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as e:
            raise SurgeryError(f"cannot write to {str(folder)!r}: {e}") from None
        tmp = candidate
        break
    if tmp is None:  # pragma: no cover
        raise SurgeryError(f"cannot create a temporary file in {str(folder)!r}")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure to ``path`` atomically (the format follows ``path``'s suffix) and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    finally:
        plt.close(fig)


def refuse_overwrite(output: PathLike, inputs: Iterable[PathLike | None], *, what: str = "the output") -> None:
    """Raise unless ``output`` is none of ``inputs`` (compared as files: symlinks and hard links count).

    Folders among ``inputs`` stand for every file under them. An output that does not exist yet
    cannot be an input.
    """
    out = Path(output).expanduser()
    try:
        out_stat = out.stat()
    except OSError:
        return
    if out.is_dir():
        return
    for item in inputs:
        if item is None:
            continue
        p = Path(item).expanduser()
        candidates: Iterable[Path]
        if p.is_dir():
            try:
                out.resolve().relative_to(p.resolve())
            except ValueError:
                if out_stat.st_nlink < 2:
                    continue  # not under the folder and no other name: cannot be one of its files
            candidates = (f for f in p.rglob("*") if f.is_file())
        else:
            candidates = (p,)
        for c in candidates:
            try:
                same = os.path.samestat(out_stat, c.stat())
            except OSError:
                continue
            if same:
                shown = f"{str(c)!r}" if c == p else f"{str(c)!r} (under {str(p)!r})"
                raise SurgeryError(
                    f"{what} {str(out)!r} is one of the inputs, {shown}; nothing was written. "
                    "Write to another file"
                )
