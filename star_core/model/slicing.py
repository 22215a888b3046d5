"""The one bound on the working memory of a layer: independent rows (frames, positions) go through in slices."""
from __future__ import annotations

# Largest intermediate one slice of a layer may create, in elements (e.g. a transformer's GEGLU projection, a
# ResBlock's widest feature map). Layers whose whole input stays below it run in one call, unchanged.
SLICE_ELEMENTS = 1 << 26


def rows_per_slice(elements_per_row: int) -> int:
    """
    How many independent rows fit in one slice of at most `SLICE_ELEMENTS` elements (at least one).

    Parameters:
        elements_per_row (`int`): size of the largest intermediate one row (a frame, a position) creates.
    """
    return max(1, SLICE_ELEMENTS // max(1, elements_per_row))
