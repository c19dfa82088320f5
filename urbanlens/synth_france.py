"""Synthetic French world for the SES pipeline, in the layouts and schemas of the real products.

    python -m urbanlens.synth_france --config configs/ses_demo.yaml [--set france.resolution_m=0.2]

Under ``<paths.data>/`` it writes, for every city of ``france.cities``:
- ``UA_data/<FUA>_<CITY>_UA2018_v013/Data/<same>.gpkg``: Urban Atlas 2018 land use (``code_2018``,
  ``class_2018``, EPSG:3035) and its ``..._UA2018_Boundary`` layer;
- ``census_data/<ses.census_file>``: the INSEE 200 m grid (``idcar_200m, ind, men, ind_snv``);
- ``aerial_data/<delivery>/``: 1 km orthophoto tiles in EPSG:2154 rendered from the land use, named
  like IGN's, with a ``dalles.shp`` tile index (column ``NOM``);
- ``ses_truth.json``: the planted income model (``rich_codes``, ``poor_codes``, class effects) and all
  generator parameters.

A city is a square of ``france.city_size_m`` in EPSG:3035: a street grid of irregular blocks, a dense
centre, residential rings, an industrial sector crossed by a motorway, a railway, a river, parks and
sports grounds, fields and forest at the edge. The income of a cell is
``base * exp(sum_c effect_c * share_c + noise * field)``, where ``share_c`` is the cell's area share of
land-use class ``c`` and ``field`` a smooth Gaussian field of unit variance. Textures are functions of
ground coordinates, so tiles join without seams and any resolution (2 m demo, 0.20 m IGN) can be
rendered tile by tile in bounded memory. Same config and seed give byte-identical files.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from .config import cli, data_dir
from .io import atomic_path, read_json, save_run_config, write_json
from .geo import L93, LAEA, inspire_id

GENERATOR_VERSION = 1
FIXED_DATE = "2021-01-01"   # written where formats store a date, so that files are byte-identical

# Urban Atlas 2018 nomenclature (spelling of the Copernicus product, double space included)
UA_CLASSES = {
    "11100": "Continuous urban fabric (S.L. : > 80%)",
    "11210": "Discontinuous dense urban fabric (S.L. : 50% -  80%)",
    "11220": "Discontinuous medium density urban fabric (S.L. : 30% - 50%)",
    "11230": "Discontinuous low density urban fabric (S.L. : 10% - 30%)",
    "11240": "Discontinuous very low density urban fabric (S.L. : < 10%)",
    "11300": "Isolated structures",
    "12100": "Industrial, commercial, public, military and private units",
    "12210": "Fast transit roads and associated land",
    "12220": "Other roads and associated land",
    "12230": "Railways and associated land",
    "12300": "Port areas",
    "12400": "Airports",
    "13100": "Mineral extraction and dump sites",
    "13300": "Construction sites",
    "13400": "Land without current use",
    "14100": "Green urban areas",
    "14200": "Sports and leisure facilities",
    "21000": "Arable land (annual crops)",
    "22000": "Permanent crops (vineyards, fruit trees, olive groves)",
    "23000": "Pastures",
    "24000": "Complex and mixed cultivation patterns",
    "25000": "Orchards at the fringe of urban classes",
    "31000": "Forests",
    "32000": "Herbaceous vegetation associations (natural grassland, moors...)",
    "33000": "Open spaces with little or no vegetation (beaches, dunes, bare rocks, glaciers)",
    "40000": "Wetlands",
    "50000": "Water",
}

# Planted income model: effect on log income per unit of area share. Rich: Haussmann-like centre, dense
# townhouses with gardens and pools, parks. Poor: industry and warehouses, large estates of slab
# buildings with car parks, motorways. Every other class has no effect.
CLASS_EFFECTS = {"11100": 1.0, "11210": 0.7, "14100": 1.0, "12100": -1.0, "11220": -1.0, "12210": -1.0}
RICH_CODES = sorted(c for c, e in CLASS_EFFECTS.items() if e > 0)
POOR_CODES = sorted(c for c, e in CLASS_EFFECTS.items() if e < 0)
BASE_INCOME = 22000.0         # EUR per person and year
NOISE_SIGMA_CELLS = 1.5       # correlation length of the spatial noise, in cells
CELL_M = 200
GRID = 0.01                   # land-use vertices on a 1 cm grid, so neighbours share edges exactly
# inhabitants per hectare of each class (absent = 0) and persons per household
DENSITY = {"11100": 230, "11210": 130, "11220": 170, "11230": 45, "11240": 12, "11300": 5,
           "12100": 6, "14100": 1, "14200": 1}
HOUSEHOLD_SIZE = {"11100": 1.8, "11210": 2.3, "11220": 2.6, "11230": 2.5, "11240": 2.5}

# Real centres (lon, lat), FUA code and department of the paper's cities; others get a made-up place.
KNOWN_CITIES = {
    "PARIS": (2.35, 48.86, "FR001L2", "75"), "LYON": (4.84, 45.76, "FR003L2", "69"),
    "MARSEILLE": (5.37, 43.30, "FR203L2", "13"), "NICE": (7.26, 43.70, "FR205L2", "06"),
    "LILLE": (3.06, 50.63, "FR009L2", "59"), "TOULOUSE": (1.44, 43.60, "FR004L2", "31"),
}
OUTSIDE = "rural"   # texture of ground outside every city's Urban Atlas


# ============================================================================ city plans (EPSG:3035)

@dataclass
class City:
    name: str
    key: str            # upper-case file-name form, e.g. PARIS
    fua: str            # e.g. FR001L2
    dept: str           # e.g. 75
    origin: tuple       # lower-left corner of the city square, EPSG:3035
    size: float
    poor_angle: float   # direction (radians) of the industrial sector from the centre
    landuse: gpd.GeoDataFrame   # code_2018, class_2018, geometry (EPSG:3035)
    boundary: shapely.Geometry

    @property
    def stem(self) -> str:
        return f"{self.fua}_{self.key}_UA2018_v013"


def city_rng(seed: int, name: str, part: str) -> np.random.Generator:
    """One independent random stream per (seed, city, purpose)."""
    return np.random.default_rng([seed, zlib.crc32(name.upper().encode()), zlib.crc32(part.encode())])


def city_origin(name: str, index: int, size: float) -> tuple[float, float, str, str]:
    """Lower-left corner (EPSG:3035, on the 200 m grid), FUA code and department of a city."""
    key = name.upper()
    lon, lat, fua, dept = KNOWN_CITIES.get(key, (0.0, 0.0, f"FR{900 + index}L2", f"{90 + index % 10:02d}"))
    if key not in KNOWN_CITIES:   # spread unknown cities over central France, 30 km apart
        lon, lat = 1.0 + 0.4 * (index % 8), 46.0 + 0.3 * (index // 8)
    x, y = Transformer.from_crs("EPSG:4326", LAEA, always_xy=True).transform(lon, lat)
    x0 = math.floor((x - size / 2) / CELL_M) * CELL_M
    y0 = math.floor((y - size / 2) / CELL_M) * CELL_M
    return float(x0), float(y0), fua, dept


def _cuts(rng, length: float, lo: float, hi: float) -> np.ndarray:
    """Street positions along one axis: irregular gaps in [lo, hi], starting before 0, ending after length."""
    cuts = [-rng.uniform(0, hi)]
    while cuts[-1] < length:
        cuts.append(cuts[-1] + rng.uniform(lo, hi))
    return np.array(cuts)


def _pick(rng, table: dict) -> str:
    codes = list(table)
    p = np.array([table[c] for c in codes], float)
    return codes[rng.choice(len(codes), p=p / p.sum())]


def _block_class(rng, rho: float, in_poor_sector: bool) -> str:
    """Land-use class of a block from its relative distance to the centre and its sector."""
    if rho < 0.3:
        return _pick(rng, {"11100": 0.75, "14100": 0.13, "11210": 0.12})
    if rho < 0.62:
        if in_poor_sector:
            return _pick(rng, {"11220": 0.50, "12100": 0.30, "11230": 0.10, "14200": 0.10})
        return _pick(rng, {"11210": 0.50, "11100": 0.12, "14100": 0.15, "11230": 0.23})
    if rho < 0.95:
        if in_poor_sector:
            return _pick(rng, {"12100": 0.50, "11220": 0.35, "11240": 0.15})
        return _pick(rng, {"11230": 0.45, "11240": 0.20, "11210": 0.15, "14200": 0.10, "14100": 0.10})
    return _pick(rng, {"21000": 0.45, "31000": 0.30, "23000": 0.15, "11240": 0.10})


def plan_city(name: str, index: int, size: float, seed: int) -> City:
    """Land-use polygons of one synthetic city, EPSG:3035."""
    rng = city_rng(seed, name, "plan")
    x0, y0, fua, dept = city_origin(name, index, size)
    half = size / 2
    poor_angle = float(rng.uniform(-math.pi, math.pi))
    # boundary: the square, most corners cut off
    cut = size * rng.uniform(0.12, 0.22, 4) * (rng.random(4) < 0.75)
    corners = [(0, 0, 1, 1), (size, 0, -1, 1), (size, size, -1, -1), (0, size, 1, -1)]
    boundary = shapely.box(0, 0, size, size)
    for (cx, cy, sx, sy), c in zip(corners, cut):
        if c > 0:
            boundary = shapely.difference(boundary, shapely.Polygon([(cx, cy), (cx + sx * c, cy), (cx, cy + sy * c)]),
                                          grid_size=GRID)
    # corridors: river, motorway through the poor sector, railway
    xs = np.linspace(-100, size + 100, 60)
    river_y = size * rng.uniform(0.3, 0.7) + size * 0.08 * np.sin(2 * math.pi * xs / (size * rng.uniform(0.6, 1.0)))
    river = shapely.LineString(np.c_[xs, river_y]).buffer(rng.uniform(30, 45), cap_style="flat")
    u = np.array([math.cos(poor_angle), math.sin(poor_angle)])
    v = np.array([-u[1], u[0]])
    centre = np.array([half, half])
    ring_road = shapely.LineString([centre + 0.5 * half * u - 2 * size * v, centre + 0.5 * half * u + 2 * size * v])
    radial = shapely.LineString([centre + 0.3 * half * u, centre + 2 * size * u])
    motorway = shapely.union(ring_road, radial).buffer(16, cap_style="flat")
    rail_dir = np.array([math.cos(poor_angle + 1.9), math.sin(poor_angle + 1.9)])
    railway = shapely.LineString([centre + 0.15 * half * rail_dir, centre + 2 * size * rail_dir])
    railway = railway.buffer(9, cap_style="flat")
    river, motorway, railway = (shapely.set_precision(g, GRID) for g in (river, motorway, railway))
    corridors = [("50000", river), ("12210", shapely.difference(motorway, river, grid_size=GRID)),
                 ("12230", shapely.difference(railway, shapely.union(river, motorway, grid_size=GRID), grid_size=GRID))]
    taken = shapely.union_all([g for _, g in corridors], grid_size=GRID)
    # blocks between irregular streets (8 m, avenues 16 m)
    gx, gy = _cuts(rng, size, 80, 200), _cuts(rng, size, 80, 200)
    wx = np.where(rng.random(len(gx)) < 0.2, 16.0, 8.0)
    wy = np.where(rng.random(len(gy)) < 0.2, 16.0, 8.0)
    rows = []
    for i in range(len(gx) - 1):
        for j in range(len(gy) - 1):
            block = shapely.box(gx[i] + wx[i] / 2, gy[j] + wy[j] / 2,
                                gx[i + 1] - wx[i + 1] / 2, gy[j + 1] - wy[j + 1] / 2)
            c = np.array([(gx[i] + gx[i + 1]) / 2, (gy[j] + gy[j + 1]) / 2]) - centre
            rho = float(np.hypot(*c) / half + rng.normal(0, 0.06))
            ang = math.atan2(c[1], c[0]) - poor_angle
            in_poor = abs(math.atan2(math.sin(ang), math.cos(ang))) < math.radians(70)
            rows.append((_block_class(rng, rho, in_poor), block))
    blocks = gpd.GeoDataFrame({"code": [r[0] for r in rows]}, geometry=[r[1] for r in rows])
    blocks["geometry"] = shapely.intersection(shapely.difference(blocks.geometry.values, taken, grid_size=GRID),
                                              boundary, grid_size=GRID)
    parts = [blocks]
    parts.append(gpd.GeoDataFrame({"code": [c for c, _ in corridors]},
                                  geometry=[shapely.intersection(g, boundary, grid_size=GRID) for _, g in corridors]))
    streets = shapely.difference(boundary, shapely.union_all([taken, *blocks.geometry.values], grid_size=GRID),
                                 grid_size=GRID)
    parts.append(gpd.GeoDataFrame({"code": ["12220"]}, geometry=[streets]))
    lu = pd.concat(parts, ignore_index=True)
    lu = lu.explode(index_parts=False)
    lu = lu[(lu.geom_type == "Polygon") & (lu.area >= 20)]
    lu = gpd.GeoDataFrame({"code_2018": lu["code"].to_numpy(), "class_2018": lu["code"].map(UA_CLASSES).to_numpy()},
                          geometry=lu.geometry.translate(x0, y0).values, crs=LAEA)
    return City(name=name, key=name.upper().replace(" ", "_"), fua=fua, dept=dept, origin=(x0, y0), size=size,
                poor_angle=poor_angle, landuse=lu.reset_index(drop=True),
                boundary=shapely.transform(boundary, lambda c: c + [x0, y0]))


# ============================================================================ census (INSEE 200 m grid)

def class_shares(cells: np.ndarray, landuse: gpd.GeoDataFrame) -> pd.DataFrame:
    """Area share of each land-use code in each cell (rows: cell order, columns: codes)."""
    tree = shapely.STRtree(landuse.geometry.values)
    ci, li = tree.query(cells, predicate="intersects")
    area = shapely.area(shapely.intersection(cells[ci], landuse.geometry.values[li]))
    frame = pd.DataFrame({"cell": ci, "code": landuse["code_2018"].to_numpy()[li], "area": area})
    shares = frame.pivot_table(index="cell", columns="code", values="area", aggfunc="sum", fill_value=0.0)
    return shares.reindex(range(len(cells)), fill_value=0.0) / shapely.area(cells)[:, None]


def census_for_city(city: City, noise: float, seed: int) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """The populated 200 m cells of a city: (census rows, per-cell truth)."""
    rng = city_rng(seed, city.name, "census")
    x0, y0 = city.origin
    n = int(math.ceil(city.size / CELL_M))
    ex, ny = np.meshgrid(x0 + CELL_M * np.arange(n), y0 + CELL_M * np.arange(n))
    ex, ny = ex.ravel(), ny.ravel()
    cells = shapely.box(ex, ny, ex + CELL_M, ny + CELL_M)
    shares = class_shares(cells, city.landuse)
    field = gaussian_filter(rng.standard_normal((n, n)), NOISE_SIGMA_CELLS, mode="reflect")
    field = (field / field.std()).ravel()
    effect = sum(shares.get(c, 0.0) * e for c, e in CLASS_EFFECTS.items())
    income = BASE_INCOME * np.exp(np.asarray(effect) + noise * field)
    hectares = CELL_M * CELL_M / 1e4
    people = sum(shares.get(c, 0.0) * d for c, d in DENSITY.items()) * hectares
    people = np.round(np.asarray(people) * rng.uniform(0.85, 1.15, len(cells)), 1)
    resid = shares.reindex(columns=list(HOUSEHOLD_SIZE), fill_value=0.0)
    hh = (resid * pd.Series(HOUSEHOLD_SIZE)).sum(axis=1) / resid.sum(axis=1).replace(0, np.nan)
    households = np.round(people / hh.fillna(2.2).to_numpy(), 1)
    ids = [inspire_id(e, y) for e, y in zip(ex, ny)]
    keep = people >= 1.0
    census = gpd.GeoDataFrame({
        "idcar_200m": np.array(ids)[keep], "ind": people[keep], "men": households[keep],
        "ind_snv": np.round(income[keep] * people[keep], 2)}, geometry=cells[keep], crs=LAEA)
    truth = pd.DataFrame({"cell_id": ids, "income": income, "ind": people, "noise_field": field})
    truth = pd.concat([truth, shares.reset_index(drop=True).add_prefix("share_")], axis=1)
    return census, truth[keep].reset_index(drop=True)


# ============================================================================ orthophotos (EPSG:2154)

def _u64(a) -> np.ndarray:
    return np.asarray(a).astype(np.int64).astype(np.uint64)


def hash2(ix, iy, salt: int) -> np.ndarray:
    """Uniform [0, 1) from integer lattice coordinates; the same everywhere, so tiles join seamlessly."""
    h = _u64(ix) * np.uint64(0x9E3779B97F4A7C15) ^ _u64(iy) * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= np.uint64((salt * 0x165667B19E3779F9) % 2**64)
    for shift, mult in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
        h ^= h >> np.uint64(shift)
        h *= np.uint64(mult)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def value_noise(x, y, scale: float, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features of about ``scale`` metres."""
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = hash2(ix, iy, salt), hash2(ix + 1, iy, salt)
    c, d = hash2(ix, iy + 1, salt), hash2(ix + 1, iy + 1, salt)
    return (a + (b - a) * fx) + ((c + (d - c) * fx) - (a + (b - a) * fx)) * fy


def fbm(x, y, scale: float, salt: int, octaves: int = 3) -> np.ndarray:
    total, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        total = total + amp * value_noise(x, y, scale / 2 ** o, salt + 101 * o)
        norm += amp
        amp *= 0.5
    return total / norm


def lots(x, y, lx: float, ly: float, salt: int):
    """Split the ground into lots of lx x ly metres, rows staggered: (lot id x, lot id y, u, v in [0, 1))."""
    iy = np.floor(y / ly)
    xs = x + hash2(iy, iy, salt) * lx
    ix = np.floor(xs / lx)
    return ix, iy, xs / lx - ix, y / ly - iy


def _palette(r: np.ndarray, colours) -> np.ndarray:
    colours = np.asarray(colours, float)
    return colours[np.minimum((r * len(colours)).astype(int), len(colours) - 1)]


def _blend(base: np.ndarray, colour, mask: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[mask] = np.broadcast_to(np.asarray(colour, float), out.shape)[mask]
    return out


def _shade(rgb: np.ndarray, factor) -> np.ndarray:
    return rgb * np.asarray(factor, float)[..., None]


def _trees(x, y, rgb, density: float, salt: int, scale: float = 7.0) -> np.ndarray:
    """Tree crowns over ``rgb`` where clustered noise exceeds 1 - density."""
    n = fbm(x, y, scale, salt)
    crown = n > 1 - density
    light = 0.8 + 0.5 * value_noise(x, y, 1.6, salt + 7)
    return _blend(rgb, _shade(np.broadcast_to([46.0, 88.0, 44.0], rgb.shape), light), crown)


def _cars(x, y, rgb, prob: float, salt: int) -> np.ndarray:
    ix, iy, u, v = lots(x, y, 2.6, 5.2, salt)
    car = (hash2(ix, iy, salt + 1) < prob) & (np.abs(u - 0.5) < 0.34) & (np.abs(v - 0.5) < 0.4)
    colour = _palette(hash2(ix, iy, salt + 2), [(215, 215, 218), (40, 40, 46), (150, 30, 32), (60, 80, 140),
                                                (170, 170, 175), (235, 235, 235)])
    return _blend(rgb, colour, car)


def _ground(x, y, base, grain: float, salt: int) -> np.ndarray:
    g = 1 + grain * (fbm(x, y, 3.0, salt) - 0.5)
    return _shade(np.broadcast_to(np.asarray(base, float), (len(x), 3)), g)


def tex_continuous(x, y):          # 11100: closed blocks of stone and zinc roofs around courtyards
    ix, iy, u, v = lots(x, y, 15, 12, 11)
    roof = _palette(hash2(ix, iy, 12), [(128, 133, 144), (100, 106, 118), (176, 170, 158), (186, 166, 136),
                                        (150, 146, 140)])
    rgb = _shade(roof, np.where(v < 0.5, 0.9, 1.06) * (1 + 0.06 * (value_noise(x, y, 1.0, 13) - 0.5)))
    rgb = _blend(rgb, (74, 74, 78), (u < 0.05) | (v < 0.05))
    bx, by, bu, bv = lots(x, y, 60, 48, 14)
    court = (np.abs(bu - 0.5) < 0.17) & (np.abs(bv - 0.5) < 0.2)
    courtyard = _trees(x, y, _ground(x, y, (156, 152, 140), 0.2, 15), 0.25, 16, 4.0)
    return _blend(rgb, courtyard, court)


def tex_townhouses(x, y):          # 11210: terraced houses, gardens, some pools
    ix, iy, u, v = lots(x, y, 11, 26, 21)
    house = v < 0.42
    roof = _palette(hash2(ix, iy, 22), [(178, 96, 72), (160, 112, 86), (148, 82, 64), (120, 110, 104)])
    rgb = _ground(x, y, (94, 140, 70), 0.25, 23)
    rgb = _trees(x, y, rgb, 0.35, 24, 5.0)
    pool = (hash2(ix, iy, 25) < 0.3) & (np.abs(u - 0.5) < 0.25) & (v > 0.7) & (v < 0.84)
    rgb = _blend(rgb, (72, 172, 204), pool)
    rgb = _blend(rgb, _shade(roof, np.where(v < 0.21, 0.88, 1.05)), house)
    return _blend(rgb, (80, 78, 76), house & (u < 0.04))


def tex_estates(x, y):             # 11220: slab blocks with flat roofs, car parks, worn lawns
    ix, iy, u, v = lots(x, y, 72, 56, 31)
    turn = hash2(ix, iy, 32) < 0.5
    a, b = np.where(turn, v, u), np.where(turn, u, v)
    slab = (np.abs(a - 0.5) < 0.4) & (np.abs(b - 0.48) < 0.12)
    rgb = _ground(x, y, (140, 142, 98), 0.3, 33)
    rgb = _trees(x, y, rgb, 0.12, 34, 6.0)
    park = b < 0.26
    lot = _cars(x, y, _ground(x, y, (98, 98, 100), 0.12, 35), 0.5, 36)
    rgb = _blend(rgb, lot, park)
    vents = (value_noise(x, y, 1.5, 37) > 0.8)
    roof = _shade(np.broadcast_to([190.0, 190.0, 184.0], rgb.shape), np.where(vents, 0.7, 1.0))
    return _blend(rgb, roof, slab)


def tex_houses(x, y, lx=22, ly=28, size=0.45, trees=0.35, pools=0.06, salt=41):   # 11230 / 11240
    ix, iy, u, v = lots(x, y, lx, ly, salt)
    du, dv = hash2(ix, iy, salt + 1) * (1 - size), hash2(ix, iy, salt + 2) * (1 - size)
    house = (u > du) & (u < du + size) & (v > dv) & (v < dv + size * 0.9)
    roof = _palette(hash2(ix, iy, salt + 3), [(186, 104, 76), (168, 120, 92), (112, 108, 106), (196, 130, 96)])
    rgb = _trees(x, y, _ground(x, y, (108, 152, 80), 0.3, salt + 4), trees, salt + 5, 6.0)
    pool = ((hash2(ix, iy, salt + 6) < pools) & (np.abs(u - du - size / 2) < 0.12)
            & (v > dv + size) & (v < dv + size + 0.12))
    rgb = _blend(rgb, (72, 172, 204), pool)
    return _blend(rgb, _shade(roof, np.where(u < du + size / 2, 0.88, 1.05)), house)


def tex_industry(x, y):            # 12100: warehouses with ribbed metal roofs, yards, trucks
    ix, iy, u, v = lots(x, y, 95, 70, 51)
    hall = (u > 0.06) & (u < 0.86) & (v > 0.1) & (v < 0.72)
    roof = _palette(hash2(ix, iy, 52), [(206, 206, 210), (122, 140, 162), (192, 182, 160), (176, 178, 180)])
    ribs = 1 + 0.06 * np.sin(2 * math.pi * x / 2.4)
    yard = _cars(x, y, _ground(x, y, (112, 112, 108), 0.15, 53), 0.18, 54)
    truck = (hash2(np.floor(x / 4), np.floor(y / 14), 55) < 0.15) & (np.mod(x, 4) < 2.6)
    yard = _blend(yard, (228, 228, 226), truck & (v > 0.76))
    return _blend(yard, _shade(roof, ribs), hall)


def tex_motorway(x, y):            # 12210: dark asphalt, markings, dense traffic
    rgb = _ground(x, y, (62, 64, 67), 0.12, 61)
    marks = hash2(np.floor(x / 3), np.floor(y / 3), 62) < 0.05
    rgb = _blend(rgb, (222, 222, 210), marks)
    return _cars(x, y, rgb, 0.3, 63)


def tex_street(x, y):              # 12220: asphalt, parked cars, street trees
    rgb = _cars(x, y, _ground(x, y, (90, 90, 92), 0.15, 71), 0.12, 72)
    return _trees(x, y, rgb, 0.12, 73, 5.0)


def tex_railway(x, y):             # 12230: ballast and rails
    rgb = _ground(x, y, (126, 114, 100), 0.35, 81)
    rails = np.mod(x + y, 1.5) < 0.18
    return _blend(rgb, (70, 62, 56), rails)


def tex_park(x, y):                # 14100: lawns, tree groves, paths
    rgb = _ground(x, y, (98, 148, 72), 0.25, 91)
    rgb = _trees(x, y, rgb, 0.45, 92, 9.0)
    path = np.abs(np.sin(x / 37.0) + np.sin(y / 41.0)) < 0.04
    return _blend(rgb, (200, 190, 162), path)


def tex_sports(x, y):              # 14200: stadiums, courts and tracks on pale concrete
    """Sports grounds read as sports grounds at a few metres a pixel: pitches of bright turf, red clay or
    blue hard courts, each ringed by a red track with wide white lines, on pale concrete and car parks
    (at 1 m or coarser a park-like green would make them indistinguishable from parks)."""
    ix, iy, u, v = lots(x, y, 96, 64, 101)
    rgb = _cars(x, y, _ground(x, y, (182, 178, 168), 0.15, 102), 0.12, 105)
    pitch = (np.abs(u - 0.5) < 0.36) & (np.abs(v - 0.5) < 0.30)
    track = (np.abs(u - 0.5) < 0.45) & (np.abs(v - 0.5) < 0.42) & ~pitch
    rgb = _blend(rgb, (184, 82, 60), track)
    surface = _palette(hash2(ix, iy, 103), [(58, 168, 62), (58, 168, 62), (196, 104, 64), (62, 104, 170)])
    rgb = _blend(rgb, _shade(surface, 1 + 0.1 * (fbm(x, y, 3.0, 104) - 0.5)), pitch)
    line = pitch & ((np.abs(np.abs(u - 0.5) - 0.34) < 0.02) | (np.abs(np.abs(v - 0.5) - 0.28) < 0.03)
                    | (np.abs(u - 0.5) < 0.015))
    return _blend(rgb, (240, 240, 240), line)


def tex_fields(x, y):              # 21000 / 13400 / rural: crop fields with tractor lines
    ix, iy, u, v = lots(x, y, 230, 150, 111)
    crop = _palette(hash2(ix, iy, 112), [(206, 186, 120), (122, 156, 80), (152, 120, 88), (218, 198, 76),
                                         (176, 166, 110)])
    angle = hash2(ix, iy, 113) * math.pi
    lines = 1 + 0.08 * np.sin(2 * math.pi * (x * np.cos(angle) + y * np.sin(angle)) / 3.2)
    rgb = _shade(crop, lines * (1 + 0.1 * (fbm(x, y, 20, 114) - 0.5)))
    hedge = (u < 0.015) | (v < 0.02)
    return _trees(x, y, _blend(rgb, (70, 96, 52), hedge), 0.04, 115, 8.0)


def tex_pasture(x, y):             # 23000
    rgb = _ground(x, y, (132, 158, 88), 0.35, 121)
    ix, iy, u, v = lots(x, y, 120, 90, 122)
    return _blend(rgb, (66, 96, 50), (u < 0.02) | (v < 0.025))


def tex_forest(x, y):              # 31000: dense crowns
    n = fbm(x, y, 4.0, 131)
    light = 0.65 + 0.7 * n
    return _shade(np.broadcast_to([44.0, 80.0, 42.0], (len(x), 3)), light)


def tex_water(x, y):               # 50000
    rgb = _ground(x, y, (40, 68, 94), 0.15, 141)
    return _shade(rgb, 1 + 0.05 * np.sin(x / 1.7 + 2 * value_noise(x, y, 10, 142)))


def tex_rural(x, y):               # outside the Urban Atlas: fields and woods
    woods = fbm(x, y, 300, 151) < 0.35
    rgb = tex_fields(x, y)
    rgb[woods] = tex_forest(x[woods], y[woods])
    return rgb


TEXTURES = {
    "11100": tex_continuous, "11210": tex_townhouses, "11220": tex_estates,
    "11230": tex_houses,
    "11240": lambda x, y: tex_houses(x, y, 45, 45, 0.26, 0.5, 0.02, 141),
    "12100": tex_industry, "12210": tex_motorway, "12220": tex_street, "12230": tex_railway,
    "13400": lambda x, y: tex_pasture(x, y) * 0.95 + 8, "14100": tex_park, "14200": tex_sports,
    "21000": tex_fields, "23000": tex_pasture, "31000": tex_forest, "50000": tex_water, OUTSIDE: tex_rural,
}
LABELS = list(TEXTURES)   # raster label of a class = its position here


def render_pixels(labels: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RGB uint8 [n, 3] for pixels with class labels and ground coordinates (EPSG:3035 metres)."""
    rgb = np.zeros((len(labels), 3))
    for lab in np.unique(labels):
        m = labels == lab
        rgb[m] = TEXTURES[LABELS[lab]](x[m], y[m])
    return np.clip(np.rint(rgb), 1, 255).astype(np.uint8)   # 0 is reserved for nodata


def tile_affine_3035(bounds, width: int, height: int) -> Affine:
    """Affine map from a tile's (col, row) to EPSG:3035; exact to well under a millimetre over 1 km."""
    left, bottom, right, top = bounds
    t = Transformer.from_crs(L93, LAEA, always_xy=True)
    (x0, x1, x2), (y0, y1, y2) = t.transform([left, right, left], [top, top, bottom])
    return Affine((x1 - x0) / width, (x2 - x0) / height, x0, (y1 - y0) / width, (y2 - y0) / height, y0)


@dataclass
class TileJob:
    path: str
    bounds: tuple          # EPSG:2154
    res: float
    shapes: list           # (geometry EPSG:3035, label) of the land use near the tile
    nodata: list           # geometries (EPSG:2154) left as nodata
    driver: str


def render_tile(job: TileJob, max_pixels: int = 1_000_000) -> str:
    """Render one orthophoto tile strip by strip (memory bounded), then write it atomically."""
    left, bottom, right, top = job.bounds
    width, height = round((right - left) / job.res), round((top - bottom) / job.res)
    a3035 = tile_affine_3035(job.bounds, width, height)
    native = from_origin(left, top, job.res, job.res)
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=L93,
                   transform=native, nodata=0, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", photometric="RGB")
    out = Path(job.path)
    with atomic_path(out) as final_tmp:
        work = final_tmp if job.driver == "GTiff" else final_tmp.with_name(final_tmp.stem + ".work.tif")
        try:
            with rasterio.open(work, "w", **profile) as dst:
                rows = max(1, min(height, max_pixels // width))
                for r0 in range(0, height, rows):
                    h = min(rows, height - r0)
                    strip_3035 = a3035 @ Affine.translation(0, r0)
                    labels = rasterize(job.shapes, out_shape=(h, width), transform=strip_3035,
                                       fill=LABELS.index(OUTSIDE), dtype="uint8") if job.shapes else \
                        np.full((h, width), LABELS.index(OUTSIDE), np.uint8)
                    cols, rr = np.meshgrid(np.arange(width) + 0.5, np.arange(h) + 0.5)
                    x, y = strip_3035 @ (cols.ravel(), rr.ravel())
                    rgb = render_pixels(labels.ravel(), np.asarray(x), np.asarray(y)).reshape(h, width, 3)
                    if job.nodata:
                        hole = rasterize([(g, 1) for g in job.nodata], out_shape=(h, width),
                                         transform=native @ Affine.translation(0, r0), fill=0, dtype="uint8")
                        rgb[hole.astype(bool)] = 0
                    dst.write(rgb.transpose(2, 0, 1), window=Window(0, r0, width, h))
            if job.driver != "GTiff":
                with rasterio.Env(GDAL_PAM_ENABLED="NO"):   # no .aux.xml beside the temporary name
                    levels = max(1, min(5, int(math.log2(max(1, min(width, height) // 32))) + 1))
                    rasterio.shutil.copy(work, final_tmp, driver=job.driver, REVERSIBLE="YES", QUALITY="100",
                                         RESOLUTIONS=str(levels), BLOCKXSIZE="512", BLOCKYSIZE="512")
        finally:
            if work != final_tmp and work.exists():
                work.unlink()
    return job.path


# ============================================================================ the world

def res_token(res: float) -> str:
    """IGN resolution token: 0.2 -> '0M20', 2.0 -> '2M00'."""
    cm = int(round(res * 100))
    return f"{cm // 100}M{cm % 100:02d}"


def tile_name(dept: str, left: float, top: float, res: float, ext: str) -> str:
    return f"{dept}-2021-{int(round(left / 1000)):04d}-{int(round(top / 1000)):04d}-LA93-{res_token(res)}-E080.{ext}"


def tile_bounds(city: City, tile_m: float) -> list[tuple]:
    """The km-aligned Lambert-93 tiles covering a city's square."""
    x0, y0 = city.origin
    left, bottom, right, top = transform_bounds(LAEA, L93, x0, y0, x0 + city.size, y0 + city.size, densify_pts=21)
    xs = np.arange(math.floor(left / tile_m) * tile_m, right, tile_m)
    ys = np.arange(math.floor(bottom / tile_m) * tile_m, top, tile_m)
    return [(float(x), float(y), float(x + tile_m), float(y + tile_m)) for y in ys[::-1] for x in xs]


def nodata_zones(city: City, tiles: list[tuple], fraction: float, seed: int) -> list:
    """Rectangles (EPSG:2154) totalling ``fraction`` of the tiles' area: one over the city, one anywhere."""
    if fraction <= 0:
        return []
    rng = city_rng(seed, city.name, "nodata")
    area = fraction * sum((b[2] - b[0]) * (b[3] - b[1]) for b in tiles)
    x0, y0 = city.origin
    cx, cy = Transformer.from_crs(LAEA, L93, always_xy=True).transform(x0 + city.size / 2, y0 + city.size / 2)
    span = [(cx, cy, 0.3 * city.size)]
    left, bottom = min(b[0] for b in tiles), min(b[1] for b in tiles)
    right, top = max(b[2] for b in tiles), max(b[3] for b in tiles)
    span.append(((left + right) / 2, (bottom + top) / 2, (right - left) / 2))
    zones = []
    for mx, my, r in span:
        w = math.sqrt(2 * area / len(span))     # 2:1 rectangles sharing the area
        h = area / len(span) / w
        if rng.random() < 0.5:
            w, h = h, w
        x, y = mx + rng.uniform(-r, r), my + rng.uniform(-r, r)
        zones.append(shapely.box(x - w / 2, y - h / 2, x + w / 2, y + h / 2))
    return zones


@contextlib.contextmanager
def fixed_gpkg_date():
    """GDAL stamps GeoPackages with the current time unless told which date to write."""
    before = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": f"{FIXED_DATE}T00:00:00.000Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": before})


def write_gpkg_layers(path: Path, layers: list[tuple[str, gpd.GeoDataFrame]]) -> None:
    with fixed_gpkg_date(), atomic_path(path) as tmp:
        for name, gdf in layers:
            gdf.to_file(tmp, layer=name, driver="GPKG", engine="pyogrio")


def write_shapefile(path: Path, gdf: gpd.GeoDataFrame) -> None:
    """A shapefile written in a temporary folder, moved in place part by part (.shp last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        gdf.to_file(Path(tmp) / path.name, driver="ESRI Shapefile", engine="pyogrio",
                    DBF_DATE_LAST_UPDATE=FIXED_DATE, ENCODING="UTF-8")
        parts = sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == ".shp")
        for part in parts:
            os.replace(part, path.with_suffix(part.suffix))


def aerial_driver() -> tuple[str, str]:
    with rasterio.Env() as env:
        return ("JP2OpenJPEG", "jp2") if "JP2OpenJPEG" in env.drivers() else ("GTiff", "tif")


def world_params(cfg) -> dict:
    """Everything the world depends on; a world on disk with other parameters is not reused."""
    return {"generator_version": GENERATOR_VERSION, "seed": cfg.seed, "france": cfg.france.to_dict(),
            "census_file": cfg.ses.census_file, "ua_dir": cfg.ses.ua_dir, "aerial_dir": cfg.ses.aerial_dir,
            "aerial_format": aerial_driver()[0]}


def ua_layers(city: City) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """The land-use and boundary layers with the columns of the Urban Atlas 2018 GeoPackage."""
    lu = city.landuse.copy()
    lu.insert(0, "country", "FR")
    lu.insert(1, "fua_name", city.name)
    lu.insert(2, "fua_code", city.fua)
    lu["identifier"] = [f"{i}-{city.fua}" for i in range(1, len(lu) + 1)]
    lu["area"], lu["perimeter"] = lu.area.round(2), lu.length.round(2)
    lu["geometry"] = [shapely.MultiPolygon([g]) for g in lu.geometry]
    boundary = gpd.GeoDataFrame({"country": ["FR"], "fua_name": [city.name], "fua_code": [city.fua]},
                                geometry=[shapely.MultiPolygon([city.boundary])], crs=LAEA)
    return lu, boundary


def tile_jobs(city: City, delivery: Path, fr, seed: int, driver: str, ext: str) -> tuple[list, gpd.GeoDataFrame]:
    """The rendering job of each of a city's tiles and the tile index (NOM, EPSG:2154)."""
    tiles = tile_bounds(city, float(fr.tile_size_m))
    holes = nodata_zones(city, tiles, float(fr.nodata_fraction), seed)
    labelled = [(g, LABELS.index(c if c in TEXTURES else "21000"))
                for g, c in zip(city.landuse.geometry.values, city.landuse["code_2018"])]
    tree = shapely.STRtree([g for g, _ in labelled])
    to_3035 = Transformer.from_crs(L93, LAEA, always_xy=True)
    jobs, names = [], []
    for b in tiles:
        nom = tile_name(city.dept, b[0], b[3], float(fr.resolution_m), ext)
        footprint = shapely.Polygon(np.c_[to_3035.transform(*shapely.box(*b).segmentize(50).exterior.coords.xy)])
        near = [labelled[i] for i in sorted(tree.query(footprint.buffer(10)))]
        hole = [h for h in holes if h.intersects(shapely.box(*b))]
        jobs.append(TileJob(str(delivery / "1_DONNEES_LIVRAISON" / nom), b, float(fr.resolution_m), near, hole, driver))
        names.append(nom)
    index = gpd.GeoDataFrame({"NOM": names}, geometry=[shapely.box(*b) for b in tiles], crs=L93)
    index.attrs["nodata_zones"] = [list(h.bounds) for h in holes]
    return jobs, index


def build_world(cfg, progress: bool = True) -> dict:
    """Write the synthetic world under ``paths.data``; return the truth record (also ses_truth.json)."""
    fr, seed = cfg.france, cfg.seed
    root = data_dir(cfg)
    if len(fr.cities) < 1:
        raise SystemExit("error: config: france.cities is empty; list the city names, e.g. [Paris, Lyon]")
    driver, ext = aerial_driver()
    files, cities_info, census_parts, truth_parts, jobs = [], {}, [], [], []
    for index, name in enumerate(fr.cities):
        city = plan_city(name, index, float(fr.city_size_m), seed)
        # Urban Atlas: <FUA>_<CITY>_UA2018_v013/Data/<same>.gpkg with a land-use and a boundary layer
        ua_path = root / cfg.ses.ua_dir / city.stem / "Data" / f"{city.stem}.gpkg"
        landuse, boundary = ua_layers(city)
        write_gpkg_layers(ua_path, [(city.stem[:-5], landuse), (f"{city.stem[:-5]}_Boundary", boundary)])
        files.append(ua_path)
        # census cells and planted income
        census, truth = census_for_city(city, float(fr.noise), seed)
        truth.insert(1, "city", name)
        census_parts.append(census)
        truth_parts.append(truth)
        # orthophotos: one delivery per department, tiles rendered below, tile index now
        delivery = (root / cfg.ses.aerial_dir /
                    f"BDORTHO_RVB-{res_token(fr.resolution_m)}_{ext.upper()}-E080_LAMB93_D0{city.dept}_2021")
        city_jobs, tile_index = tile_jobs(city, delivery, fr, seed, driver, ext)
        jobs += city_jobs
        index_path = delivery / "3_SUPPLEMENTS_LIVRAISON" / "dalles.shp"
        write_shapefile(index_path, tile_index)
        files += [index_path.with_suffix(s) for s in (".shp", ".shx", ".dbf", ".prj", ".cpg")]
        cities_info[name] = {"fua_code": city.fua, "department": city.dept, "origin_3035": list(city.origin),
                             "size_m": city.size, "poor_sector_angle_rad": round(city.poor_angle, 6),
                             "ua_polygons": len(landuse), "census_cells": len(census), "tiles": len(tile_index),
                             "nodata_zones_2154": tile_index.attrs["nodata_zones"]}
    census_path = root / cfg.ses.census_file
    census = gpd.GeoDataFrame(pd.concat(census_parts, ignore_index=True), crs=LAEA)
    census = census.drop_duplicates("idcar_200m").sort_values("idcar_200m").reset_index(drop=True)
    write_gpkg_layers(census_path, [("carreaux_200m_met", census)])
    files.append(census_path)
    render_all(jobs, int(cfg.workers), progress)
    files += [Path(j.path) for j in jobs]
    truth = {
        "rich_codes": RICH_CODES, "poor_codes": POOR_CODES,
        "class_effects": CLASS_EFFECTS,
        "class_names": {c: UA_CLASSES[c] for c in sorted(CLASS_EFFECTS)},
        "income_model": "income = base_income * exp(sum_c class_effects[c] * area_share_c + noise * field); "
                        "field: Gaussian white noise on the 200 m grid smoothed with sigma noise_sigma_cells, "
                        "scaled to unit variance; ind_snv = income * ind",
        "base_income": BASE_INCOME, "noise": float(fr.noise), "noise_sigma_cells": NOISE_SIGMA_CELLS,
        "population_density_per_ha": DENSITY, "household_size": HOUSEHOLD_SIZE,
        "cell_size_m": CELL_M, "params": world_params(cfg), "seed": seed, "cities": cities_info,
        "composition_r2": _composition_r2(pd.concat(truth_parts, ignore_index=True)),
        "files": sorted(str(p.relative_to(root)) for p in files),
    }
    write_json(root / "ses_truth.json", truth)
    return truth


def render_all(jobs: list[TileJob], workers: int, progress: bool = True) -> None:
    """Render the tiles, in ``workers`` processes."""
    bar = tqdm(total=len(jobs), desc="orthophoto tiles", unit="tile", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            render_tile(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(render_tile, jobs):
                bar.update()
    bar.close()


def _composition_r2(truth: pd.DataFrame) -> float:
    """Share of log-income variance explained by land-use composition (the learnable part)."""
    comp = sum(truth.get(f"share_{c}", 0.0) * e for c, e in CLASS_EFFECTS.items())
    li = np.log(truth["income"])
    return round(float(np.corrcoef(comp, li)[0, 1] ** 2), 4) if len(truth) > 2 else float("nan")


def existing_world(cfg) -> dict | None:
    """The truth record of a complete world already under paths.data, or None."""
    path = data_dir(cfg, "ses_truth.json")
    return read_json(path) if path.is_file() else None


def remove_world(cfg, truth: dict) -> None:
    """Delete the files a previous synthetic world listed (nothing else)."""
    root = data_dir(cfg)
    for rel in truth.get("files", []):
        (root / rel).unlink(missing_ok=True)
    (root / "ses_truth.json").unlink(missing_ok=True)
    (root / "world_config.yaml").unlink(missing_ok=True)


def main() -> None:
    cfg, _ = cli("Build the synthetic French world (Urban Atlas, INSEE grid, IGN-like orthophotos).",
                 "configs/ses_demo.yaml")
    root = data_dir(cfg)
    old = existing_world(cfg)
    if old is not None:
        if old.get("params") == world_params(cfg):
            print(f"[synth_france] world already built in {root} for this config and seed "
                  f"({root / 'ses_truth.json'}); nothing to do")
            return
        if not cfg.overwrite:
            raise SystemExit(f"error: {root / 'ses_truth.json'}: a synthetic world with other parameters is there; "
                             "use --set overwrite=true to replace it, or another paths.data")
        remove_world(cfg, old)
    start = time.time()
    truth = build_world(cfg)
    save_run_config(cfg, root, "world_config.yaml")  # the full config (seed included) beside the world
    cells = sum(c["census_cells"] for c in truth["cities"].values())
    tiles = sum(c["tiles"] for c in truth["cities"].values())
    print(f"[synth_france] {len(truth['cities'])} cities, {cells} census cells, {tiles} tiles "
          f"({truth['params']['aerial_format']}, {cfg.france.resolution_m} m) in {time.time() - start:.1f} s "
          f"-> {root} (truth: {root / 'ses_truth.json'})")


if __name__ == "__main__":
    main()
