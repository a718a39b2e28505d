"""Write files whole or not at all: a temporary file beside the target, fsynced, then renamed.

The rename alone makes a file appear whole to other processes, and survives the writer being
killed. Surviving power loss also needs the data and the rename on disk: the temporary file is
fsynced before the rename (else the renamed file may come back empty or short after a crash),
and its folder after it (else the rename itself may be lost). Only once atomic_path returns is
it safe to delete what the new file replaces, e.g. an older checkpoint.
"""
import contextlib
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)
_IN_FLIGHT = set()  # the temporary paths of the writes in progress (discard_in_flight)
_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows filesystems


def fsync_file(path):
    """Flush a file's data to disk (whoever wrote it: Keras, NumPy and Pillow write by path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder):
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders cannot be
    opened (Windows), where the rename is made durable by the filesystem itself."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder (EINVAL): nothing more can be done
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` (same suffixes); move it onto `path` on success.

    The rename is atomic on one filesystem, so readers never see a half-written file and
    an existing file is replaced only once the new one is complete and on disk (fsync of the
    file, rename, fsync of the folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:])  # keeps ".weights.h5", which Keras requires
    if len(os.fsencode(suffix)) > 32:  # a dot in a long name is no suffix of Keras's
        suffix = path.suffix if len(os.fsencode(path.suffix)) <= 32 else ""
    # ".NAME.XXXXXXXX.SUFFIX" must fit the usual 255-byte limit on a name, however long NAME is
    room = _NAME_MAX - len(os.fsencode(suffix)) - 11
    name = os.fsencode(path.name)
    stem = name[:room].decode("utf-8", "ignore") if len(name) > room else path.name  # cut between characters
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=path.parent)
    _IN_FLIGHT.add(tmp)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _IN_FLIGHT.discard(tmp)


def discard_in_flight():
    """Remove the temporary files of the writes in progress, for a process about to end at once (os._exit
    from a signal handler): every target is left as it was, whole, and no temporary file stays behind."""
    for tmp in list(_IN_FLIGHT):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
