"""Randomness as a pure function of a key: the same key gives the same number in every process and every run, so
draws that depend on (seed, rank, epoch, index) need no RNG state to resume exactly."""

from __future__ import annotations

import hashlib


def stable_hash(*key) -> int:
    """A 64-bit number from ``repr(key)`` (blake2b), the same across processes, platforms and Python sessions
    (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
