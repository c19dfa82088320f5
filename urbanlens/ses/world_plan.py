"""Planning a synthetic French city: blocks of land use, planted income effects, the census."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import Transformer
from scipy.ndimage import gaussian_filter

from ..core.errors import ConfigError
from .grid import LAEA, block_ids, inspire_id
from . import world_structure
from .world_leakage import income_shift

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


def more_houses(codes: list, rhos: list, share: float, rng) -> list:
    """``codes`` of the blocks with each one inside the rural edge (relative distance ``rhos`` < 0.95)
    redrawn as detached houses with probability ``share`` (11230 within 0.62 of the centre, 11240
    beyond); every code unchanged for share 0."""
    if share <= 0:
        return list(codes)
    draw = rng.random(len(codes))
    return [("11230" if r < 0.62 else "11240") if r < 0.95 and d < share else c
            for c, r, d in zip(codes, rhos, draw)]


def plan_city(name: str, index: int, size: float, seed: int, houses: float = 0.0) -> City:
    """Land-use polygons of one synthetic city, EPSG:3035; ``houses`` > 0 turns that share of the blocks
    inside the rural edge into detached houses (``more_houses``, a random stream of its own)."""
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
    rows, rhos = [], []
    for i in range(len(gx) - 1):
        for j in range(len(gy) - 1):
            block = shapely.box(gx[i] + wx[i] / 2, gy[j] + wy[j] / 2,
                                gx[i + 1] - wx[i + 1] / 2, gy[j + 1] - wy[j + 1] / 2)
            c = np.array([(gx[i] + gx[i + 1]) / 2, (gy[j] + gy[j + 1]) / 2]) - centre
            rho = float(np.hypot(*c) / half + rng.normal(0, 0.06))
            ang = math.atan2(c[1], c[0]) - poor_angle
            in_poor = abs(math.atan2(math.sin(ang), math.cos(ang))) < math.radians(70)
            rows.append((_block_class(rng, rho, in_poor), block))
            rhos.append(rho)
    codes = more_houses([r[0] for r in rows], rhos, houses, city_rng(seed, name, "houses"))
    blocks = gpd.GeoDataFrame({"code": codes}, geometry=[r[1] for r in rows])
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


def class_shares(cells: np.ndarray, landuse: gpd.GeoDataFrame) -> pd.DataFrame:
    """Area share of each land-use code in each cell (rows: cell order, columns: codes)."""
    tree = shapely.STRtree(landuse.geometry.values)
    ci, li = tree.query(cells, predicate="intersects")
    area = shapely.area(shapely.intersection(cells[ci], landuse.geometry.values[li]))
    frame = pd.DataFrame({"cell": ci, "code": landuse["code_2018"].to_numpy()[li], "area": area})
    shares = frame.pivot_table(index="cell", columns="code", values="area", aggfunc="sum", fill_value=0.0)
    return shares.reindex(range(len(cells)), fill_value=0.0) / shapely.area(cells)[:, None]


def census_for_city(city: City, noise: float, seed: int, leakage: float = 0.0,
                    structure: float = 0.0) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """The populated 200 m cells of a city: (census rows, per-cell truth); ``leakage`` > 0 shifts log
    income by the planted district field at the cell centres (world_leakage); ``structure`` > 0 moves
    that share of the planted signal from composition to the houses' arrangement (world_structure)."""
    rng = city_rng(seed, city.name, "census")
    x0, y0 = city.origin
    n = int(math.ceil(city.size / CELL_M))
    ex, ny = np.meshgrid(x0 + CELL_M * np.arange(n), y0 + CELL_M * np.arange(n))
    ex, ny = ex.ravel(), ny.ravel()
    cells = shapely.box(ex, ny, ex + CELL_M, ny + CELL_M)
    shares = class_shares(cells, city.landuse)
    field = gaussian_filter(rng.standard_normal((n, n)), NOISE_SIGMA_CELLS, mode="reflect")
    field = (field / field.std()).ravel()
    effect = np.asarray(sum(shares.get(c, 0.0) * e for c, e in CLASS_EFFECTS.items()))
    log_shift = income_shift(ex + CELL_M / 2, ny + CELL_M / 2, leakage, seed)
    if structure > 0:
        houses = np.asarray(sum(shares.get(c, 0.0) for c in world_structure.HOUSE_CODES))
        effect = (1 - structure) * effect + world_structure.income_term(ex + CELL_M / 2, ny + CELL_M / 2, houses,
                                                                        structure, seed)
    income = BASE_INCOME * np.exp(effect + noise * field + log_shift)
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
    if structure > 0:
        truth["arranged"] = world_structure.cell_sign(ex + CELL_M / 2, ny + CELL_M / 2, seed) > 0
    truth = pd.concat([truth, shares.reset_index(drop=True).add_prefix("share_")], axis=1)
    return census, truth[keep].reset_index(drop=True)


def withheld_cells(city: City, cell_ids, share: float, seed: int, mode: str = "random",
                   block_m: float = 1000.0) -> np.ndarray:
    """True for the populated cells (``cell_ids``, INSPIRE ids) of a city that the census withholds.

    ``random``: each cell with probability ``share`` (seeded). ``blocks``: whole ``block_m`` squares of the
    EPSG:3035 grid, drawn in a seeded random order until the withheld cells come closest to ``share`` of
    the cells (at least one block), so that a withheld cell's neighbours are mostly withheld too.
    """
    n_cells = len(cell_ids)
    if share <= 0 or n_cells == 0:
        return np.zeros(n_cells, dtype=bool)
    if mode == "random":
        return city_rng(seed, city.name, "withhold").random(n_cells) < share
    if mode != "blocks":
        raise ConfigError("config", f"ses.world.withhold_mode={mode!r} is not a withholding mode",
                          "set ses.world.withhold_mode to random or blocks")
    blocks = block_ids(cell_ids, block_m)
    names, counts = np.unique(blocks, return_counts=True)
    order = city_rng(seed, city.name, "withhold-blocks").permutation(len(names))
    taken = np.cumsum(counts[order])
    k = int(np.argmin(np.abs(taken - share * n_cells))) + 1
    return np.isin(blocks, names[order[:k]])
