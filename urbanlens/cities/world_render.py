"""Rendering one synthetic city image from its style parameters."""
from __future__ import annotations

import colorsys
import math

import numpy as np

STYLE_KEYS = (
    "orientation",   # street-grid angle, 0..45 degrees (flips make larger angles equivalent)
    "block",         # street spacing
    "street",        # street width
    "lot",           # lot (building) size
    "footprint",     # share of a lot covered by its building
    "density",       # share of lots that hold a building
    "vegetation",    # trees, lawns and parks
    "water",         # chance and width of a river
    "roof_hue",      # main roof colour
    "roof_sat",      # roof colour saturation
    "roof_light",    # roof brightness
    "gable",         # share of pitched (two-tone) roofs
    "ground_hue",    # pavement from grey concrete to ochre sand
    "ground_light",  # pavement brightness
    "height",        # building height, i.e. shadow length
    "irregularity",  # how much streets bend away from a straight grid
)

def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _physical(style: dict, scale: float) -> dict:
    """Pixel sizes, probabilities and colours from the normalised style (sizes x ``scale``)."""
    s = {k: float(style[k]) for k in STYLE_KEYS}
    block = scale * (18 + 40 * s["block"])
    street = scale * (1.6 + 4.5 * s["street"])
    gh, gl = s["ground_hue"], s["ground_light"]
    hue = 0.72 * s["roof_hue"]   # red .. orange .. yellow .. green .. cyan .. blue, no wrap-around
    sat = 0.08 + 0.7 * s["roof_sat"]
    light = 0.42 + 0.45 * s["roof_light"]
    ground = _hsv(0.07 + 0.06 * gh, 0.04 + 0.32 * gh, 0.42 + 0.36 * gl)
    return {
        "angle": math.radians(45 * s["orientation"]),
        "block_u": block, "block_v": block * (1.2 + 0.5 * s["lot"]),
        "street": street, "avenue": street * 1.9, "avenue_every": 3 + int(round(3 * s["block"])),
        "margin": scale * 1.2,
        "lot": scale * (4.5 + 13 * s["lot"]),
        "footprint": 0.45 + 0.48 * s["footprint"],
        "density": 0.2 + 0.8 * s["density"],
        "vegetation": 0.03 + 0.62 * s["vegetation"],
        "water": float(np.clip(1.5 * s["water"] - 0.25, 0.0, 1.0)),
        "river_width": scale * (7 + 30 * s["water"]),
        "gable": s["gable"],
        "shadow": scale * (0.6 + 4.5 * s["height"]),
        "warp": scale * 22 * s["irregularity"] ** 1.5,
        "warp_cell": block * 5,
        "tree": scale * (5.5 + 3 * s["vegetation"]),
        "palette": np.stack([
            _hsv(hue, sat, light),
            _hsv(hue + 0.03, sat * 0.85, light * 0.78),
            _hsv(hue - 0.04, sat * 0.6, min(light * 1.15, 0.95)),
            _hsv(0.6, 0.03, 0.5 + 0.4 * s["roof_light"]),
        ]),
        "palette_p": np.array([0.4, 0.25, 0.15, 0.2]),
        "ground": ground,
        "sidewalk": np.minimum(ground * 1.18 + 0.04, 1.0),
        "asphalt": _hsv(0.6, 0.05, 0.2 + 0.12 * gl),
        "paint": _hsv(0.14, 0.2, 0.85),
        "grass": _hsv(0.27 - 0.08 * gh, 0.38 + 0.2 * s["vegetation"], 0.36 + 0.12 * gl),
        "tree_rgb": _hsv(0.3 - 0.05 * gh, 0.5 + 0.15 * s["vegetation"], 0.24 + 0.06 * gl),
        "water_rgb": _hsv(0.54 + 0.04 * gh, 0.45, 0.3 + 0.08 * gl),
    }


def _value_noise(grid: np.ndarray, x: np.ndarray, y: np.ndarray, cell: float, pad: float) -> np.ndarray:
    """Smooth noise in [0, 1]: ``grid`` (a lattice every ``cell`` px from -pad) interpolated at (x, y)."""
    gx = (x + pad) / cell
    gy = (y + pad) / cell
    fx = np.clip(np.floor(gx), 0, grid.shape[1] - 2)
    fy = np.clip(np.floor(gy), 0, grid.shape[0] - 2)
    tx = np.clip(gx - fx, 0, 1)
    ty = np.clip(gy - fy, 0, 1)
    x0, y0 = fx.astype(np.intp), fy.astype(np.intp)
    tx = tx * tx * (3 - 2 * tx)
    ty = ty * ty * (3 - 2 * ty)
    a, b = grid[y0, x0], grid[y0, x0 + 1]
    c, d = grid[y0 + 1, x0], grid[y0 + 1, x0 + 1]
    return a + (b - a) * tx + (c - a) * ty + (a - b - c + d) * tx * ty


def _noise_grid(rng: np.random.Generator, size: int, cell: float, pad: float) -> np.ndarray:
    n = int(math.ceil((size + 2 * pad) / cell)) + 2
    return rng.random((n, n), dtype=np.float32)


class _Plan:
    """Per-image random choices: grid phase, lot and tree tables, noise lattices, river."""

    def __init__(self, P: dict, rng: np.random.Generator, size: int):
        self.pad = pad = P["shadow"] + P["warp"] + 4
        ca, sa = math.cos(P["angle"]), math.sin(P["angle"])
        self.rot = (ca, sa)
        self.u0, self.v0 = rng.uniform(0, P["block_u"]), rng.uniform(0, P["block_v"])
        corners = np.array([[-pad, -pad], [-pad, size + pad], [size + pad, -pad], [size + pad, size + pad]])
        u = corners[:, 0] * ca + corners[:, 1] * sa + self.u0
        v = -corners[:, 0] * sa + corners[:, 1] * ca + self.v0
        self.bi0 = int(math.floor((u.min() - P["warp"]) / P["block_u"])) - 1
        self.bj0 = int(math.floor((v.min() - P["warp"]) / P["block_v"])) - 1
        nbi = int(math.floor((u.max() + P["warp"]) / P["block_u"])) - self.bi0 + 2
        nbj = int(math.floor((v.max() + P["warp"]) / P["block_v"])) - self.bj0 + 2
        inner_u = P["block_u"] - P["street"] - 2 * P["margin"]
        inner_v = P["block_v"] - P["street"] - 2 * P["margin"]
        self.n_lu = max(1, int(round(inner_u / P["lot"])))
        self.n_lv = max(1, int(round(inner_v / P["lot"])))
        self.block_rand = rng.random((nbi, nbj), dtype=np.float32)        # park or built block
        self.lot_rand = rng.random((nbi * nbj * self.n_lu * self.n_lv, 9), dtype=np.float32)
        nt = int(math.ceil((size + 2 * pad) / P["tree"])) + 2
        self.tree_rand = rng.random((nt, nt, 4), dtype=np.float32)
        self.warp_u = _noise_grid(rng, size, P["warp_cell"], pad)
        self.warp_v = _noise_grid(rng, size, P["warp_cell"], pad)
        self.grass_cell = P["block_u"] * 0.6
        self.grass_noise = _noise_grid(rng, size, self.grass_cell, pad)
        self.river = None
        if rng.random() < P["water"]:
            phi = rng.uniform(0, math.pi)
            self.river = dict(cos=math.cos(phi), sin=math.sin(phi),
                              centre=rng.uniform(0.2, 0.8) * size, amp=rng.uniform(0.03, 0.12) * size,
                              wave=rng.uniform(0.6, 1.6) * size, phase=rng.uniform(0, 2 * math.pi),
                              cx=size / 2, cy=size / 2)


def _layout(P: dict, plan: _Plan, x: np.ndarray, y: np.ndarray) -> dict:
    """Street grid, lots and buildings at image coordinates (x, y)."""
    ca, sa = plan.rot
    u = x * ca + y * sa + plan.u0
    v = -x * sa + y * ca + plan.v0
    if P["warp"] > 0:
        u = u + P["warp"] * (2 * _value_noise(plan.warp_u, x, y, P["warp_cell"], plan.pad) - 1)
        v = v + P["warp"] * (2 * _value_noise(plan.warp_v, x, y, P["warp_cell"], plan.pad) - 1)
    bi = np.floor(u / P["block_u"])
    bj = np.floor(v / P["block_v"])
    fu = u - bi * P["block_u"]
    fv = v - bj * P["block_v"]
    av_u = (bi % P["avenue_every"]) == 0
    av_v = (bj % P["avenue_every"]) == 0
    wide, narrow = np.float32(P["avenue"]), np.float32(P["street"])
    wu = np.where(av_u, wide, narrow)
    wv = np.where(av_v, wide, narrow)
    road_u, road_v = fu < wu, fv < wv
    road = road_u | road_v
    # dashed centre line on avenues, away from crossings
    paint_w = max(0.5, 0.12 * P["avenue"])
    dash = P["avenue"] * 1.5
    paint = ((road_u & av_u & ~road_v & (np.abs(fu - wu / 2) < paint_w / 2) & ((v % (2 * dash)) < dash))
             | (road_v & av_v & ~road_u & (np.abs(fv - wv / 2) < paint_w / 2) & ((u % (2 * dash)) < dash)))
    bii = np.clip(bi.astype(np.intp) - plan.bi0, 0, plan.block_rand.shape[0] - 1)
    bjj = np.clip(bj.astype(np.intp) - plan.bj0, 0, plan.block_rand.shape[1] - 1)
    iu, iv = fu - wu, fv - wv                       # coordinates inside the block
    span_u = P["block_u"] - wu - 2 * P["margin"]
    span_v = P["block_v"] - wv - 2 * P["margin"]
    lu, lv = (iu - P["margin"]) / span_u, (iv - P["margin"]) / span_v   # 0..1 across the lot area
    inside = ~road & (lu >= 0) & (lu < 1) & (lv >= 0) & (lv < 1)
    sidewalk = ~road & ~inside
    park = plan.block_rand[bii, bjj] < 0.35 * P["vegetation"]
    fi = np.clip(np.floor(lu * plan.n_lu), 0, plan.n_lu - 1)
    fj = np.clip(np.floor(lv * plan.n_lv), 0, plan.n_lv - 1)
    li, lj = fi.astype(np.intp), fj.astype(np.intp)
    lot_id = ((bii * plan.block_rand.shape[1] + bjj) * plan.n_lu + li) * plan.n_lv + lj
    r = np.take(plan.lot_rand, lot_id, axis=0)      # (..., 9) random values of the pixel's lot
    pu = lu * plan.n_lu - fi                        # 0..1 inside the lot
    pv = lv * plan.n_lv - fj
    fp = P["footprint"]
    half_u = 0.5 * np.clip(fp + 0.2 * (r[..., 1] - 0.5), 0.25, 0.98)
    half_v = 0.5 * np.clip(fp + 0.2 * (r[..., 2] - 0.5), 0.25, 0.98)
    cu = 0.5 + (0.5 - half_u) * (r[..., 3] - 0.5)
    cv = 0.5 + (0.5 - half_v) * (r[..., 4] - 0.5)
    building = inside & ~park & (r[..., 0] < P["density"]) & (np.abs(pu - cu) < half_u) & (np.abs(pv - cv) < half_v)
    return dict(road=road, paint=paint, sidewalk=sidewalk, inside=inside, park=park, building=building,
                lot_rand=r, pu=pu - cu, pv=pv - cv, half_u=half_u, half_v=half_v,
                lawn=inside & ~park & ~building & (r[..., 8] < P["vegetation"] * 1.2))


def _strip(P: dict, plan: _Plan, rng: np.random.Generator, y0: int, y1: int, size: int) -> np.ndarray:
    # lay out s extra rows above and columns to the left: the shadow at (x, y) is the building at
    # (x - s, y - s), i.e. the same mask shifted by s pixels
    s = max(1, int(round(P["shadow"])))
    ys, xs = np.mgrid[y0 - s:y1, -s:size].astype(np.float32)
    xs += 0.5
    ys += 0.5
    L = _layout(P, plan, xs, ys)
    shadow = L["building"][:-s, :-s]
    L = {k: v[s:, s:] for k, v in L.items()}
    xs, ys = xs[s:, s:], ys[s:, s:]
    shadow = shadow & ~L["building"]
    grain = _value_noise(plan.grass_noise, xs, ys, plan.grass_cell, plan.pad)[..., None]
    img = np.empty((y1 - y0, size, 3), np.float32)
    img[:] = P["ground"]
    img[L["sidewalk"]] = P["sidewalk"]
    lawn = (L["park"] & L["inside"]) | L["lawn"]
    img[lawn] = P["grass"]
    img[L["park"] & ~L["inside"] & ~L["road"]] = P["grass"] * 0.9
    img *= 0.9 + 0.2 * grain
    img[L["road"]] = P["asphalt"]
    img[L["paint"]] = P["paint"]
    # trees: one round crown per tree cell where the cell's dice allow it
    T = P["tree"]
    tx = np.clip(np.floor((xs + plan.pad) / T), 0, plan.tree_rand.shape[1] - 1)
    ty = np.clip(np.floor((ys + plan.pad) / T), 0, plan.tree_rand.shape[0] - 1)
    tr = plan.tree_rand[ty.astype(np.intp), tx.astype(np.intp)]
    radius = T * (0.28 + 0.2 * tr[..., 1])
    ox = (tx * T - plan.pad) + radius + (T - 2 * radius) * tr[..., 2]
    oy = (ty * T - plan.pad) + radius + (T - 2 * radius) * tr[..., 3]
    d = np.sqrt((xs - ox) ** 2 + (ys - oy) ** 2) / radius
    p_tree = np.where(L["park"], np.float32(0.75),
                      np.where(lawn, np.float32(0.8 * P["vegetation"]), np.float32(0.35 * P["vegetation"])))
    tree = (d < 1) & (tr[..., 0] < p_tree) & ~L["building"]
    crown = np.clip(1.15 - 0.45 * d - 0.25 * ((xs - ox) + (ys - oy)) / (radius + 1e-6) * 0.5, 0.55, 1.2)
    img[tree] = P["tree_rgb"] * crown[tree][:, None]
    img[shadow] *= 0.5                              # buildings cast shadows to the lower right
    # roofs: palette colour per lot, per-lot brightness, pitched roofs split along their long axis
    r = L["lot_rand"]
    cum = np.cumsum(P["palette_p"])
    idx = np.minimum(np.searchsorted(cum, r[..., 5]), len(cum) - 1)
    b = L["building"]
    roof = P["palette"][idx[b]] * (0.88 + 0.24 * r[..., 6][b])[:, None]
    gable = r[..., 7][b] < P["gable"]
    along_u = L["half_u"][b] < L["half_v"][b]
    side = np.where(along_u, L["pu"][b], L["pv"][b]) > 0
    shade = np.where(gable, np.where(side, 1.12, 0.82), 1.0)
    edge = np.minimum(L["half_u"][b] - np.abs(L["pu"][b]), L["half_v"][b] - np.abs(L["pv"][b]))
    shade = shade * np.where(edge < 0.04, 0.85, 1.0)       # a thin darker rim outlines each roof
    img[b] = roof * shade[:, None]
    # water: a meandering river over everything but the bridges (streets crossing it)
    if plan.river is not None:
        rv = plan.river
        t = (xs - rv["cx"]) * rv["cos"] + (ys - rv["cy"]) * rv["sin"]
        n = -(xs - rv["cx"]) * rv["sin"] + (ys - rv["cy"]) * rv["cos"] + rv["cx"]
        dist = np.abs(n - rv["centre"] - rv["amp"] * np.sin(2 * np.pi * t / rv["wave"] + rv["phase"]))
        half = P["river_width"] / 2
        bank = (dist < half + max(1.0, 0.15 * half)) & ~L["road"]
        water = (dist < half) & ~L["road"]
        img[bank] = P["sidewalk"] * 0.95
        img[water] = P["water_rgb"] * (0.92 + 0.16 * grain[water])
    img += rng.normal(0.0, 0.025, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_image(style: dict, rng: np.random.Generator, size: int, scale: float = 1.0,
                 strip_pixels: int = 1 << 20) -> np.ndarray:
    """One overhead view (``size`` x ``size`` RGB uint8) drawn from a (site) style.

    ``scale`` multiplies every feature size (1 suits 96 px patches; 5 the paper's 480 px patches).
    Rows are drawn in strips of about ``strip_pixels`` pixels to bound memory.
    """
    P = _physical(style, scale)
    plan = _Plan(P, rng, size)
    rows = max(1, strip_pixels // size)
    out = np.empty((size, size, 3), np.uint8)
    for y0 in range(0, size, rows):
        y1 = min(size, y0 + rows)
        out[y0:y1] = _strip(P, plan, rng, y0, y1, size)
    return out
