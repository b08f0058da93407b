"""Writing the CLI's result files: checked before any work starts, each file written to a temp
name beside it and renamed into place (an interrupted run leaves old files or none, never a
truncated one)."""
import json
import math
import os
import tempfile

from .errors import CLIError


def ensure_writable_dir(path, option="--out"):
    """Create `path` if needed and prove a file can be written there; else a one-line CLIError."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nf4lora-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"cannot write to {option} {path}: {e.strerror or e}")
    return path


def ensure_writable_file(path, option):
    """The directory of an output file exists (created if needed) and is writable."""
    parent = os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(parent, option)
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory")
    return path


def _atomic(path, write):
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def finite(obj):
    """obj with every NaN / inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path, obj):
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(finite(obj), f, indent=2, allow_nan=False)
            f.write("\n")
    return _atomic(path, w)


def save_figure(fig, path):
    """Save a matplotlib figure as PNG, atomically."""
    return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
