"""Writing outputs so that a kill at any moment leaves the old output, the new one, or none.

:func:`atomic_write` hands out paths inside a private temporary folder beside the target, with the
targets' own names (so an ``.onnx`` finds its ``.data`` there and can be validated where it lies),
and on success moves them into place under an exclusive lock on the folder (a second writer
waits). For a pair (a model and its external data) the order is::

    1. the old model moves out of the way (into the temporary folder)
    2. the new data file is renamed over the old one
    3. the new model is renamed into place          <- the commit

so an old model never sits beside new data: killed before 3, the model is absent (its data alone
loads nothing); killed after, the new pair is complete. A killed run's temporary folder
(``.<name>.<pid>.<random>.tmp``) is removed by the next write to the same target once that process
is gone. Files get the permissions the umask gives (``mkstemp`` would leave 0600). SIGTERM should
unwind like Ctrl-C: :func:`terminate_as_interrupt` makes it raise ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> None:
    """Temporary folders of earlier writes to ``target`` whose process no longer runs."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        parts = tmp.name[len(target.name) + 2:].split(".")
        if tmp.is_dir() and parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _alive(int(parts[0])):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(*targets: Path, validate: Callable[[list[Path]], None] | None = None) -> Iterator[list[Path]]:
    """Temporary paths for ``targets`` (all in one folder); moved into place, last target last, only if
    the body and ``validate(temporary paths)`` succeed. The last target is the commit (the model)."""
    folder = targets[-1].parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale(targets[-1])
    tmp = Path(tempfile.mkdtemp(prefix=f".{targets[-1].name}.{os.getpid()}.", suffix=".tmp", dir=folder))
    try:
        temps = [tmp / t.name for t in targets]
        yield temps
        mode = 0o666 & ~_umask()
        for t in temps:
            if t.exists():
                os.chmod(t, mode)
        if validate is not None:
            validate(temps)
        with _folder_lock(folder):
            if len(targets) > 1 and targets[-1].exists():
                os.replace(targets[-1], tmp / ".previous")  # 1. the old model leaves first
            for t, target in zip(temps[:-1], targets[:-1]):
                os.replace(t, target)  # 2. its companions
            os.replace(temps[-1], targets[-1])  # 3. the commit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def terminate_as_interrupt() -> Callable[[], None]:
    """From now on SIGTERM raises KeyboardInterrupt (so cleanup runs as for Ctrl-C); returns the undo."""
    previous = signal.getsignal(signal.SIGTERM)

    def _raise(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave it
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
