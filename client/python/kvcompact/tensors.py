"""numpy/torch arrays <-> v1.Tensor (bytes + dtype + shape)."""
from __future__ import annotations

from typing import Any

import numpy as np

from kvcompact.proto import pb

_DTYPE_SIZE = {pb.DTYPE_FP32: 4, pb.DTYPE_FP16: 2, pb.DTYPE_BF16: 2}


def to_numpy_wire(x: Any) -> tuple[np.ndarray, int]:
    """Returns a C-contiguous array whose bytes are the wire encoding, and its v1 dtype."""
    if type(x).__module__.startswith("torch"):
        import torch  # only when torch tensors are passed

        t = x.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), pb.DTYPE_BF16
        if t.dtype == torch.float16:
            return t.numpy(), pb.DTYPE_FP16
        return t.to(torch.float32).numpy(), pb.DTYPE_FP32
    a = np.ascontiguousarray(x)
    if a.dtype == np.float16:
        return a, pb.DTYPE_FP16
    if a.dtype.name == "bfloat16":  # ml_dtypes
        return a.view(np.int16), pb.DTYPE_BF16
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a, pb.DTYPE_FP32


def fill_tensor(msg: Any, a: np.ndarray, dtype: int) -> None:
    msg.dtype = dtype
    msg.shape.extend(a.shape)
    msg.data = a.tobytes()


def numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype a v1 dtype decodes to: bf16 as ml_dtypes.bfloat16."""
    if dtype == pb.DTYPE_FP16:
        return np.dtype(np.float16)
    if dtype == pb.DTYPE_BF16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


def from_tensor(t: Any) -> np.ndarray:
    """Decodes a v1.Tensor to numpy in its own dtype (bf16 as ml_dtypes.bfloat16, two bytes per
    value like the wire; `.astype(np.float32)` widens it)."""
    shape = tuple(t.shape)
    return np.frombuffer(t.data, dtype=numpy_dtype(t.dtype if t.dtype else pb.DTYPE_FP32)).reshape(shape)


def dtype_size(dtype: int) -> int:
    return _DTYPE_SIZE[dtype]
