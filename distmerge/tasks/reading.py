"""Reading base and output bytes inside a task: one descriptor per file, exact positioned reads
straight into tensors, and one-element scales.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "s.bin")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(torch.tensor([0.5, 0.25]).numpy().tobytes())
    >>> files = OpenFiles()
    >>> read_scalar(files.fd(path), 4, "F32").item(), files.fd(path) == files.fd(path)
    (0.25, True)
    >>> files.close()
"""

from __future__ import annotations

import os

import torch

from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.rawio import pread_exact, read_bytes
from distmerge.inputs.torch_dtypes import to_torch

__all__ = ["OpenFiles", "read_bytes", "read_into", "read_scalar"]


class OpenFiles:
    """Input files opened read-only on first use and kept open until ``close`` (one task's inputs)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def read_into(fd: int, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 tensor ``buf`` from ``offset`` (no intermediate copy)."""
    pread_exact(fd, buf.numpy().data.cast("B"), offset)


def read_scalar(fd: int, offset: int, code: str, nbytes: int | None = None) -> torch.Tensor:
    """The one-element tensor of dtype ``code`` at ``offset`` (``nbytes`` long, by default one
    element) as a float32 0-d tensor."""
    raw = read_bytes(fd, offset, itemsize(code) if nbytes is None else nbytes)
    return torch.frombuffer(raw, dtype=to_torch(code)).to(torch.float32).reshape(())
