"""What every task body does before and around its work: the torch device with distmerge's float32
policy, and I/O errors turned into one-line ``ShardWriteError``s naming the file and key.

Example:
    >>> task_device("cpu", threads=None).type
    'cpu'
    >>> try:
    ...     with io_errors(lambda e: f"/in/base.safetensors: 'w': cannot read it ({e.strerror})"):
    ...         raise FileNotFoundError(2, "No such file or directory")
    ... except ShardWriteError as e:
    ...     print(e)
    /in/base.safetensors: 'w': cannot read it (No such file or directory)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from distmerge.errors import DistmergeError, ShardWriteError

__all__ = ["io_errors", "task_device"]


def task_device(device: str, threads: int | None = None) -> torch.device:
    """The task's torch device, with its intra-op ``threads`` set (when given), and on a GPU full
    float32 math: TF32 would round every GEMM (a delta, a sketch) to 10 mantissa bits."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return dev


@contextmanager
def io_errors(message: Callable[[OSError], str | ShardWriteError]) -> Iterator[None]:
    """Let distmerge's own errors through; an ``OSError`` becomes a ``ShardWriteError`` whose text
    (or the error itself) ``message`` makes, naming the file and key in hand."""
    try:
        yield
    except DistmergeError:
        raise
    except OSError as e:
        made = message(e)
        raise (made if isinstance(made, ShardWriteError) else ShardWriteError(made)) from None
