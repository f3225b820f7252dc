"""Write-then-rename helpers, so nothing on disk is ever left half-written.

Temporaries live beside their target under a recognisable name that carries the writer's process id
(``.NAME.spineseg-tmpPID.XXXX``). A process killed mid-write leaves one behind; the next run that
writes there removes the temporaries of writers that are no longer alive
(:func:`remove_stale_temporaries`), so debris never accumulates or gets in the way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import SpinesegError

TMP_MARK = ".spineseg-tmp"
_TMP_NAME = re.compile(r"^\.(?P<target>.+)" + re.escape(TMP_MARK) + r"(?P<pid>\d+)\.(?P<rest>.*)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    return f".{path.name}{TMP_MARK}{os.getpid()}."


def _tmp_name(path: Path) -> Path:
    # keep the full suffix (".nii.gz") so writers that look at the extension still work
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; return what was removed.

    A folder that a killed replacement had moved aside (``...old``) while its successor was not yet in
    place is moved back instead of removed, so no finished output is ever lost.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TMP_NAME.match(entry.name)
        if not m or _alive(int(m["pid"])):
            continue
        target = folder / m["target"]
        if m["rest"].endswith("old") and entry.is_dir() and not target.exists():
            os.replace(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        _fsync(tmp)  # the data on disk before the rename, else a crash could leave the new name on an empty file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself; some file systems cannot sync a folder
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a file system without fsync is no error; a failed flush (EIO, ENOSPC) is
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Build a directory under a temporary name and move it into place at the end.

    An existing non-empty ``path`` is refused unless ``overwrite``; then it is replaced only once the
    new one is complete, so a failure leaves the old one untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpinesegError("exists and is not a folder", path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SpinesegError("folder exists and is not empty (use --overwrite to replace it)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".partial", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if path.exists():
        old = path.with_name(f"{_prefix(path)}old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_parent(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise SpinesegError(f"parent folder {parent} does not exist (create it first)", path)
    if not parent.is_dir():
        raise SpinesegError(f"{parent} is not a folder", path)


def _check_writable(folder: Path, path: Path) -> None:
    # a real probe: permission bits, root, read-only mounts and ACLs all decide differently than os.access
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(Path("write-test")), dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpinesegError(f"folder {folder} is not writable ({exc.strerror or exc})", path) from None


def check_output_folder(path: str | Path) -> Path:
    """An output folder that can be created or written to: one clear error before any work otherwise."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SpinesegError("exists and is not a folder", path)
        _check_writable(path, path)
    else:
        _check_parent(path)
        _check_writable(path.parent, path)
    return path


def check_output_file(path: str | Path) -> Path:
    """An output file whose folder exists and can be written to, and which is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise SpinesegError("is a folder; an output file name was expected", path)
    _check_parent(path)
    _check_writable(path.parent, path)
    return path
