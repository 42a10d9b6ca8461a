"""The runtime's user-facing errors (importable without torch or CuPy)."""

from __future__ import annotations


class RuntimeUnavailable(RuntimeError):
    """No GPU runtime here: CuPy, the CUDA driver or a suitable CUDA device is missing."""


class LaunchError(RuntimeError):
    """A CUDA driver call failed; the message names the call and its CUresult."""

    def __init__(self, call: str, code: int, name: str):
        super().__init__(f"{call} failed: {name} ({code})")
        self.call, self.code, self.name = call, code, name
