"""A planted leakage for the synthetic French world: districts that look and earn alike.

With ``ses.world.leakage`` = s > 0, every district (a square of ``DISTRICT_M`` on the EPSG:3035 grid)
gets a random colour cast (RGB, N(0, 1) each, times ``TINT_LEVELS`` * s grey levels) and a random
shift of log income (N(0, 1) times s), drawn together from the seed and the district. The field is
flat inside a district and passes smoothly to the next one over a seam of ``SEAM_M`` on each side of
the border (smoothstep), so the imagery shows no hard edge, while every 200 m cell centre (at least
100 m from a border) carries its own district's values. Within a district a model can learn "this
cast, this income"; in a district it never saw, the cast is new and tells nothing. Random folds of
cells reward that; spatial folds whose blocks are the districts do not.
"""
from __future__ import annotations

import numpy as np

DISTRICT_M = 1000.0


SEAM_M = 100.0   # half-width of the smooth passage between two districts


TINT_LEVELS = 30.0


def _node_values(seed: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """[n, 4] (R, G, B cast, income shift) of districts (i, j), each district its own stream."""
    out = np.empty((len(i), 4))
    for k, (a, b) in enumerate(zip(i, j)):
        out[k] = np.random.default_rng([int(seed), 7_777, int(a) + 2**20, int(b) + 2**20]).standard_normal(4)
    return out


def _seam(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis in district units: the district on the low side of the nearest border, and the
    weight of the high side (0 inside a district, smoothstep across the seam, 1 past it)."""
    border = np.rint(u)
    t = np.clip((u - border) * DISTRICT_M / (2 * SEAM_M) + 0.5, 0.0, 1.0)
    return border.astype(np.int64) - 1, t * t * (3 - 2 * t)


def district_field(x, y, seed: int) -> np.ndarray:
    """[n, 4] unit-scale field (cast R, G, B, income shift) at EPSG:3035 points (x, y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return np.zeros((0, 4))
    (i0, fu), (j0, fv) = _seam(x / DISTRICT_M), _seam(y / DISTRICT_M)
    fu, fv = fu[:, None], fv[:, None]
    ia, ja = np.arange(i0.min(), i0.max() + 2), np.arange(j0.min(), j0.max() + 2)
    ii, jj = np.meshgrid(ia, ja, indexing="ij")
    grid = _node_values(seed, ii.ravel(), jj.ravel()).reshape(len(ia), len(ja), 4)
    a, b = i0 - ia[0], j0 - ja[0]
    return ((1 - fu) * (1 - fv) * grid[a, b] + fu * (1 - fv) * grid[a + 1, b] + (1 - fu) * fv * grid[a, b + 1]
            + fu * fv * grid[a + 1, b + 1])


def tint(rgb: np.ndarray, x, y, strength: float, seed: int) -> np.ndarray:
    """``rgb`` [n, 3] (uint8) with the district cast added; unchanged for strength 0."""
    if strength <= 0:
        return rgb
    cast = district_field(x, y, seed)[:, :3] * TINT_LEVELS * strength
    return np.clip(np.rint(rgb + cast), 1, 255).astype(np.uint8)   # 0 stays reserved for nodata


def income_shift(x, y, strength: float, seed: int) -> np.ndarray:
    """Shift of log income at (x, y) (cell centres); zeros for strength 0."""
    if strength <= 0:
        return np.zeros(len(np.asarray(x)))
    return district_field(x, y, seed)[:, 3] * strength
