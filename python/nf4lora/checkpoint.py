"""Training state on disk, crash-safe: the optimizer (PagedAdamW or any torch optimizer), an LR
scheduler, the RNG streams and a step counter in one file, so a run killed at any moment resumes
from the last complete save and continues bit for bit (the adapter itself goes through
save_adapter / load_adapter).

  nl.save_training_state("ckpt/state.pt", opt, sched, step=step)       # temp file + rename
  info = nl.load_training_state("ckpt/state.pt", opt, sched)           # info["step"]

The file is torch.save of plain tensors and Python values; loading uses torch.load(weights_only=True)
(no arbitrary pickle), and checks the layout before anything is restored.
"""
import random

import torch

from ._files import atomic_path

FORMAT = "nf4lora-training-state"
VERSION = 1


def _rng_state():
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def save_training_state(path, optimizer, scheduler=None, step=None, extra=None):
    """Write optimizer.state_dict(), scheduler.state_dict() (if given), the torch (CPU and CUDA) and
    Python RNG states, `step` and `extra` (tensors / plain values) to `path`, crash-safe."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    state = {"format": FORMAT, "version": VERSION, "optimizer": optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng": _rng_state(), "step": step, "extra": extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path, optimizer, scheduler=None, restore_rng=True):
    """Restore what save_training_state wrote into `optimizer` (and `scheduler`, and the RNGs unless
    restore_rng=False). Returns {"step": ..., "extra": ...}."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or foreign file: torch's unpickler/zip errors vary
        raise ValueError(f"{path} is not a readable nf4lora training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an nf4lora training state (no format '{FORMAT}')")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: training-state version {state.get('version')!r}, expected {VERSION}")
    for key in ("optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"{path}: '{key}' must be a dict")
    if scheduler is not None and not isinstance(state.get("scheduler"), dict):
        raise ValueError(f"{path} holds no scheduler state, but a scheduler was given")
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return {"step": state.get("step"), "extra": state.get("extra")}
