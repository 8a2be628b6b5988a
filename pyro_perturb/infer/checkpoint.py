"""Atomic, weights-only checkpoints.

Files are written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written checkpoint. The previous checkpoint is kept as
``checkpoint.prev.pt``; a truncated or corrupted latest checkpoint falls back to it.
Everything is loaded with ``torch.load(weights_only=True)``: a run directory can never
execute code. Each saved dictionary carries a SHA-256 digest of its contents
(``"sha256"``): ``torch.load`` does not notice flipped bytes inside a tensor, so without
it a corrupted file would load silently with wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


DIGEST_KEY = "sha256"


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:  # numbers, strings, booleans, None
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def state_digest(state: dict) -> str:
    """SHA-256 of a (nested) checkpoint dictionary's keys, tensor bytes and values."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save atomically; a dictionary gets its content digest under ``"sha256"``."""
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: state_digest(obj)}
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error for bad files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zips, tampered payloads
        raise ValueError(
            f"{path} is not a valid pyro-perturb weights file (truncated, corrupted, or "
            f"holding something other than plain tensors): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if isinstance(state, dict) and DIGEST_KEY in state:
        stored = state.pop(DIGEST_KEY)
        if stored != state_digest(state):
            raise ValueError(
                f"{path} is not a valid pyro-perturb weights file (corrupted: its contents do not "
                f"match the SHA-256 digest written with it)"
            )
    return state


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """Write ``state`` as the latest checkpoint, keeping the previous one."""
    run_dir = Path(run_dir)
    latest = run_dir / CHECKPOINT
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=run_dir)
    os.close(fd)
    try:
        atomic_torch_save(state, Path(tmp))
        if latest.exists():
            os.replace(latest, run_dir / PREVIOUS)
        os.replace(tmp, latest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(run_dir: Path) -> dict:
    """The latest readable checkpoint; falls back to the previous one with a warning."""
    run_dir = Path(run_dir)
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = safe_load(path)
            if not isinstance(state, dict) or "epoch" not in state:
                raise ValueError(f"{path} is not a pyro-perturb checkpoint")
            if errors:
                warnings.warn(f"{errors[0]}; resuming from {path} instead")
            return state
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("no readable checkpoint: " + " | ".join(errors))
    raise FileNotFoundError(f"no checkpoint in {run_dir}; nothing to resume")
