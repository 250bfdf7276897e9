"""Independent random streams from one user seed.

Two objects drawn from ``torch.Generator().manual_seed(seed)`` with the same seed share their first
draws: a start vector seeded like the matrix it probes would be a row of that matrix. Every random
object of the suite therefore draws from its own named stream.
"""

import zlib

import torch


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` derived from ``seed``; different streams are unrelated."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(stream.encode()) * 0xBF58476D1CE4E5B9)
    return mixed % (2**63 - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for the named stream."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))
