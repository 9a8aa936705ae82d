"""Output files: check a path before any computation, then write it atomically.

``eva init`` spends minutes computing before it writes anything, so a bad ``--out``/``--plot``
must be caught up front (:func:`check_output_path`), and the final write must never leave a
half-written file or destroy the previous one (:func:`atomic_write`: temporary file in the same
directory, flushed to disk, then ``os.replace``).
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Callable

from .errors import EvaError

_PROBE_PREFIX = ".eva-probe-"


def _errno_text(exc: OSError) -> str:
    """``'No space left on device (ENOSPC)'`` from an ``OSError`` (falls back to ``str(exc)``)."""
    code = getattr(exc, "errno", None)
    text = exc.strerror or str(exc)
    name = errno.errorcode.get(code) if code is not None else None
    return f"{text} ({name})" if name else text


def _advice(exc: OSError) -> str:
    """What the user can do about a failed create/write, by errno."""
    code = getattr(exc, "errno", None)
    if code == errno.EROFS:
        return "the file system is read-only; choose a path on a writable file system"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission to create files there; choose a directory you can write to"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "the disk (or quota) is full; free some space or choose another file system"
    if code == errno.ENAMETOOLONG:
        return "the file name is too long; choose a shorter one"
    return "choose another path"


def _nearest_existing(path: str) -> str:
    """The longest prefix of absolute ``path`` that exists (``lexists``: a dangling link counts)."""
    cur = path
    while not os.path.lexists(cur):
        parent = os.path.dirname(cur)
        if parent == cur:  # the root itself is always there; defensive
            break
        cur = parent
    return cur


def check_output_path(path: str, what: str) -> str:
    """Check, before any computation, that ``path`` can be written as a file; return it absolute.

    Raises :class:`~eva.errors.EvaError` with a one-line message ``"{what} {path!r}: <problem>;
    <what to do>"`` when the path is empty, is an existing directory, exists but is not a regular
    file (a device, a FIFO, ...), has a component that is a file, or when its nearest existing
    ancestor directory cannot hold new files (read-only file system, no permission, ...).

    Writability is probed by really creating and removing an empty temporary file in the nearest
    existing ancestor directory (permission bits alone say nothing when running as root). Missing
    parent directories are fine: :func:`atomic_write` creates them. The target itself is never
    created, opened or truncated.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise EvaError(f"{what} {path!r}: empty path; give a file name")
    path = os.fspath(path)
    full = os.path.abspath(path)
    if os.path.isdir(full):
        example = os.path.join(path, "ranks.png" if "plot" in what.lower() else "eva_state_dict.safetensors")
        raise EvaError(f"{what} {path!r}: is a directory; give a file name inside it, e.g. {example!r}")
    if os.path.lexists(full):
        try:
            st = os.stat(full)
        except OSError:  # a dangling symlink: writing creates its target, like open(path, "w")
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise EvaError(f"{what} {path!r}: exists and is not a regular file (a device, pipe or socket); "
                           "choose a file path")
    base = os.path.basename(full)
    ancestor = _nearest_existing(os.path.dirname(full))
    if not os.path.isdir(ancestor):
        raise EvaError(f"{what} {path!r}: {ancestor!r} is a file, not a directory, so nothing can be created "
                       "under it; choose another path")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if name_max and len(os.fsencode(base)) > name_max:
        raise EvaError(f"{what} {path!r}: the file name is longer than {name_max} bytes; choose a shorter one")
    probe = os.path.join(ancestor, f"{_PROBE_PREFIX}{secrets.token_hex(6)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise EvaError(f"{what} {path!r}: cannot create files in {ancestor!r}: {_errno_text(exc)}; "
                       f"{_advice(exc)}") from exc
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return full


def _fsync_path(path: str, directory: bool = False) -> None:
    """fsync a file (or, best effort, a directory) by path."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Write ``path`` through ``write(tmp)`` so that it is replaced all at once or not at all.

    1. Missing parent directories are created (``os.makedirs``).
    2. A temporary file ``.<name>.<random>.tmp<suffix>`` is created in the same directory
       (same suffix as ``path``, so writers that look at the extension behave) with mode
       ``0o666`` filtered by the process umask -- exactly what ``open(path, "w")`` would give
       (0644 under umask 022); when ``path`` already exists as a regular file its permission
       bits are kept instead, as overwriting it in place would.
    3. ``write(tmp)`` fills it (it may open ``tmp`` with ``"wb"``; it must not delete it).
    4. The file is fsynced, its mode set, then ``os.replace(tmp, path)`` swaps it in and the
       directory is fsynced (best effort). A ``path`` that is a symlink is followed: the link's
       target is replaced and the link kept.

    On any exception (including ``KeyboardInterrupt``) the temporary file is removed and an
    existing file at ``path`` is left untouched. An ``OSError`` (from ``write`` or from these
    steps: disk full, read-only file system, permission denied, ...) is re-raised as an
    :class:`~eva.errors.EvaError` naming ``path`` and the errno text, chained to the original
    (``exc.__cause__`` is the ``OSError``); every other exception propagates unchanged.
    Returns ``path`` (as given).
    """
    target = os.path.realpath(os.path.abspath(os.fspath(path)))
    directory, base = os.path.split(target)
    suffix = os.path.splitext(base)[1]
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            st = os.stat(target)
            keep_mode = stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None
        except FileNotFoundError:
            keep_mode = None
        for _ in range(100):
            candidate = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp{suffix}")
            try:
                # 0o666 & ~umask, as open(path, "w") does; no need to read (and race on) the umask
                fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:
            raise FileExistsError(errno.EEXIST, "could not pick an unused temporary name", directory)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode) if keep_mode is None else keep_mode
        finally:
            os.close(fd)
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, mode)  # the writer may have recreated the file with other bits
        os.replace(tmp, target)
        tmp = None
        _fsync_path(directory, directory=True)
    except OSError as exc:
        raise EvaError(f"cannot write {os.fspath(path)!r}: {_errno_text(exc)}; {_advice(exc)} "
                       "(nothing was written; an existing file is unchanged)") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path
