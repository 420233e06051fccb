"""bfloat16 as ``uint16`` bit patterns in numpy (numpy and numba have no bfloat16 type).

A bfloat16 is the high half of a float32: ``f32 = bits << 16`` reinterpreted, exactly; the float32 ->
bfloat16 direction rounds to nearest, ties to even (what ``torch.Tensor.to(torch.bfloat16)`` does), so
float32 values that were upcast from bfloat16 round-trip exactly. The compiled kernels read these
bits directly (:func:`.kernels.bf16_bits_to_f32`); these are the numpy versions.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import BF16_SHIFT

#: rounding bias of round-to-nearest-even on the 16 dropped bits (plus the kept LSB for ties)
_RNE_BIAS = np.uint32(0x7FFF)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 array (any shape; finite) -> uint16 bfloat16 bits of the same shape, rounded to nearest even
    (torch's vectorised, multi-threaded conversion; :func:`f32_to_bf16_bits_np` is the plain reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size == 0:
        return np.zeros(x.shape, np.uint16)
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def f32_to_bf16_bits_np(x: np.ndarray) -> np.ndarray:
    """Plain numpy reference of :func:`f32_to_bf16_bits` (round to nearest, ties to even, on the bits)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (u >> np.uint32(BF16_SHIFT)) & np.uint32(1)
    return ((u + _RNE_BIAS + lsb) >> np.uint32(BF16_SHIFT)).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits (any shape) -> float32 array of the same shape (exact; torch's vectorised,
    multi-threaded conversion, several times faster than the numpy shift :func:`bf16_bits_to_f32_np`)."""
    bits = np.asarray(bits, dtype=np.uint16)
    if bits.size == 0:
        return np.zeros(bits.shape, np.float32)
    return bits_as_tensor(bits).float().numpy()


def bf16_bits_to_f32_np(bits: np.ndarray) -> np.ndarray:
    """Plain numpy reference of :func:`bf16_bits_to_f32`: the bits become the high half of a float32."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(BF16_SHIFT)).view(np.float32)


def as_float32(a: np.ndarray) -> np.ndarray:
    """Any float array, or a uint16 array of bfloat16 bits, as float32 (a copy unless already float32)."""
    if a.dtype == np.uint16:
        return bf16_bits_to_f32(a)
    return np.asarray(a, dtype=np.float32)


def tensor_as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array without copying: bfloat16 as uint16 bits, float16/float32 as they are
    (other dtypes are converted to float32, a copy)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float16, torch.float32):
        return t.numpy()
    return t.float().numpy()


def bits_as_tensor(bits: np.ndarray) -> torch.Tensor:
    """uint16 bfloat16 bits -> a torch bfloat16 tensor sharing the memory."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
