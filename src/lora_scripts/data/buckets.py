"""Aspect-ratio buckets (as sd-scripts' enable_bucket): every (w, h) with sides a multiple of `step`
inside [lo, hi] and an area no larger than resolution², so a 2:3 portrait trains as 2:3 instead of
losing a third of the picture to a square crop."""

from __future__ import annotations

import math


def make_buckets(resolution: int, lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = lo
    while w <= hi:
        h = min(hi, (max_area // w) // step * step)
        if h >= lo:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
