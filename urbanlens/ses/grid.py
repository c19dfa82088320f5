"""The INSPIRE 200 m grid: cell ids, cell boxes, the two CRSs of the French data."""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import pandas as pd
import shapely

LAEA = "EPSG:3035"     # INSPIRE grid, Urban Atlas


L93 = "EPSG:2154"      # IGN orthophotos


CELL_PREFIX = "FR_URBANATLAS_200m_"


_INSPIRE = re.compile(r"^CRS(\d+)RES(\d+)mN(\d+)E(\d+)$", re.IGNORECASE)


def inspire_id(easting: float, northing: float, res: int = 200) -> str:
    """INSPIRE id of the grid cell whose lower-left corner is (easting, northing) in EPSG:3035 metres."""
    return f"CRS3035RES{int(res)}mN{int(round(northing))}E{int(round(easting))}"


def parse_inspire_id(cell_id: str) -> tuple[int, int, int]:
    """``'CRS3035RES200mN2862200E3759800'`` -> (3759800, 2862200, 200): (easting, northing, res)."""
    m = _INSPIRE.match(str(cell_id).strip())
    if not m or m.group(1) != "3035":
        raise ValueError(f"not an EPSG:3035 INSPIRE cell id: {cell_id!r} (expected CRS3035RES200mN<y>E<x>)")
    return int(m.group(4)), int(m.group(3)), int(m.group(2))


def cell_box(cell_id: str) -> shapely.Polygon:
    """The cell's square in EPSG:3035."""
    e, n, r = parse_inspire_id(cell_id)
    return shapely.box(e, n, e + r, n + r)


def valid_ids(cell_ids: Iterable[str]) -> np.ndarray:
    """True where an id is an EPSG:3035 INSPIRE cell id (``CRS3035RES<res>mN<y>E<x>``, spaces around allowed)."""
    ids = pd.Series(list(cell_ids), dtype=object).astype(str).str.strip()
    parts = ids.str.extract(_INSPIRE)
    return (parts[3].notna() & (parts[0] == "3035")).to_numpy()


def cell_boxes(cell_ids: Iterable[str]) -> np.ndarray:
    """Vectorised ``cell_box``: an array of squares; ValueError naming the first id that does not parse."""
    ids = pd.Series(list(cell_ids), dtype=object).astype(str).str.strip()
    parts = ids.str.extract(_INSPIRE)
    bad = parts[3].isna() | (parts[0] != "3035")
    if bad.any():
        raise ValueError(f"not an EPSG:3035 INSPIRE cell id: {ids[bad].iloc[0]!r}")
    res, n, e = (parts[i].astype(np.int64).to_numpy() for i in (1, 2, 3))
    return shapely.box(e, n, e + res, n + res)


def cell_origins(cell_ids) -> np.ndarray:
    """[n, 2] lower-left corners (easting, northing, EPSG:3035 metres) of INSPIRE cells."""
    return np.array([parse_inspire_id(c)[:2] for c in cell_ids], dtype=np.int64).reshape(-1, 2)


def block_ids(cell_ids, block_m: float) -> np.ndarray:
    """The block of each cell: ``'E<x>N<y>'`` of the lower-left corner of the ``block_m`` square of the
    EPSG:3035 grid holding the cell's lower-left corner."""
    xy = cell_origins(cell_ids)
    b = np.floor(xy / float(block_m)).astype(np.int64) * int(block_m)
    return np.array([f"E{x}N{y}" for x, y in b], dtype=object)
