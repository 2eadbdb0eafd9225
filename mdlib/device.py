"""Where torch work runs: a parameter everywhere in mdlib, never an assumption.

A GPU is optional: every function takes ``device`` and defaults to CUDA when there is one. Running on several
GPUs (one process each) is in docs/reconstruct.md, "Running it".
"""

from __future__ import annotations

import warnings

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU. Asking for CUDA without one warns and uses the CPU
    (a GPU is optional everywhere in mdlib)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA is not available: using the CPU", RuntimeWarning, stacklevel=3)
        return torch.device("cpu")
    return device
