"""Crash-safe file writes: every file nf4lora writes (adapters, bitsandbytes checkpoints, training
state) goes to a temporary file in the same directory, is flushed and fsync'ed, and replaces the
target with one os.replace (atomic on POSIX and Windows), so a process killed at any moment leaves
either the previous file or the new one at `path`, never a truncated mix. A killed write may leave
its hidden temporary file (`.<name>.tmp-<pid>-<random>`) behind; the next successful write of the
same name removes the ones whose writer is gone.
"""
import contextlib
import os
import secrets


def _tmp_prefix(path):
    d, name = os.path.split(os.path.abspath(path))
    return d, f".{name}.tmp-"


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale(d, prefix):
    """Temporary files of this name left by writers that no longer run."""
    try:
        names = os.listdir(d)
    except OSError:  # pragma: no cover
        return
    for n in names:
        if not n.startswith(prefix):
            continue
        try:
            pid = int(n[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(d, n))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; when the block finishes without an exception, the file
    written there is fsync'ed and renamed onto `path`. On an exception it is removed, and `path`
    keeps what it held before."""
    d, prefix = _tmp_prefix(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(d)
    _remove_stale(d, prefix)


def atomic_write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))
