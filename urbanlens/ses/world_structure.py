"""A planted income component that lives in spatial structure at equal colour statistics.

With ``ses.world.structure`` = s > 0, the low-density residential classes (11230, 11240) are drawn as
square lots on a lattice of the EPSG:3035 grid (whole lots per 200 m census cell), one detached house a
lot, of the same size, roof colours, shading, gardens and pools everywhere. Each census cell is, by a
seeded coin, either *arranged* (every house at the same place in its lot: straight rows and columns
aligned with the streets; the place is drawn once for the cell) or *scattered* (each house at its own
random place in its lot), places drawn from the same distribution either way. Houses stay
at least ``MARGIN_M`` from their lot's edge, so they never touch a neighbour in either arrangement.

So the colour histogram, the built-up share and every local (few-pixel) pattern of a cell do not depend
on its arrangement; only where the houses sit relative to each other, at the scale of a lot (tens of
metres), does. The planted log income is

    (1 - s) * sum_c effect_c * share_c + s * STRUCTURE_EFFECT * a * w + noise * field

with a = +1 (arranged) or -1 (scattered) and w the cell's area share of the two classes: s moves the
planted signal from composition, which colour statistics read, to arrangement, which they do not.
s = 0 is the world without this module (byte-identical files).
"""
from __future__ import annotations

import numpy as np

from .world_textures import pick_palette, shaded, with_trees, ground_texture, blended, hash2

CELL_M = 200.0
HOUSE_CODES = ("11230", "11240")
# lot side (m; a divisor of CELL_M, so cells hold whole lots), house side as a share of the lot
LOTS = {"11230": (40.0, 0.36), "11240": (50.0, 0.29)}
MARGIN_M = 5.0               # least distance from a house to its lot's edge
STRUCTURE_EFFECT = 2.0       # log income per unit area share of the two classes, arranged minus scattered halved
SALT = 9_001


def arranged(cx, cy, seed: int) -> np.ndarray:
    """True where the 200 m cell (index cx, cy on the EPSG:3035 grid) is arranged, by a seeded coin."""
    return hash2(np.asarray(cx) + 7919 * int(seed), cy, SALT) < 0.5


def cell_sign(x, y, seed: int) -> np.ndarray:
    """+1 (arranged) or -1 (scattered) of the cell holding each EPSG:3035 point."""
    return np.where(arranged(np.floor(np.asarray(x, float) / CELL_M), np.floor(np.asarray(y, float) / CELL_M),
                             seed), 1.0, -1.0)


def income_term(x, y, share: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """Structure part of log income at cell centres (x, y) with house-class area share ``share``."""
    if strength <= 0:
        return np.zeros(len(np.asarray(x)))
    return strength * STRUCTURE_EFFECT * cell_sign(x, y, seed) * np.asarray(share, float)


def tex_lots(x, y, code: str, seed: int) -> np.ndarray:
    """RGB [n, 3] of a house class drawn on the lot lattice, arranged or scattered by cell."""
    side, size = LOTS[code]
    salt = 9_100 + 10 * HOUSE_CODES.index(code)
    ix, iy = np.floor(x / side), np.floor(y / side)
    u, v = x / side - ix, y / side - iy
    lo, hi = MARGIN_M / side, 1 - size - MARGIN_M / side       # range of the house's lower-left corner
    per_cell = CELL_M / side
    cx, cy = np.floor(ix / per_cell), np.floor(iy / per_cell)
    regular = arranged(cx, cy, seed)
    # arranged: one place drawn for the whole cell; scattered: one per lot (same distribution either way)
    kx, ky = np.where(regular, cx, ix), np.where(regular, cy, iy)
    du = lo + (hi - lo) * hash2(kx, ky + np.where(regular, 2**31, 0), salt + 1)
    dv = lo + (hi - lo) * hash2(kx, ky + np.where(regular, 2**31, 0), salt + 2)
    house = (u > du) & (u < du + size) & (v > dv) & (v < dv + size)
    roof = pick_palette(hash2(ix, iy, salt + 3), [(186, 104, 76), (168, 120, 92), (112, 108, 106), (196, 130, 96)])
    rgb = with_trees(x, y, ground_texture(x, y, (108, 152, 80), 0.3, salt + 4), 0.3, salt + 5, 6.0)
    pool = ((hash2(ix, iy, salt + 6) < 0.1) & (np.abs(u - du - size / 2) < 0.1)
            & (v > dv + size + 0.02) & (v < dv + size + 0.02 + MARGIN_M / side * 0.8))
    rgb = blended(rgb, (72, 172, 204), pool)
    return blended(rgb, shaded(roof, np.where(u < du + size / 2, 0.88, 1.05)), house)


def redraw_houses(rgb: np.ndarray, codes: np.ndarray, x, y, strength: float, seed: int) -> np.ndarray:
    """``rgb`` [n, 3] (uint8) with the house-class pixels (``codes``: land-use code of each pixel) drawn
    on the lot lattice; unchanged for strength 0."""
    if strength <= 0:
        return rgb
    out = rgb.copy()
    for code in HOUSE_CODES:
        m = codes == code
        if m.any():
            out[m] = np.clip(np.rint(tex_lots(x[m], y[m], code, seed)), 1, 255).astype(np.uint8)
    return out
