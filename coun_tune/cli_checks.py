"""Checks of command-line inputs shared by the `coun-tune` commands (kept apart from cli.py so
the command modules import them without importing the CLI that imports them)."""

from __future__ import annotations

import os
from pathlib import Path

from coun_tune.errors import UsageError


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Fail before any work if the results could not be written, or would overwrite another
    run's files (an existing non-empty directory) without --overwrite."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace its files")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output {str(out)!r} is not writable")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if d.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
