"""Textures of the synthetic orthophotos: one procedural texture per land-use class."""
from __future__ import annotations

import math

import numpy as np

OUTSIDE = "rural"   # texture of ground outside every city's Urban Atlas


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


def pick_palette(r: np.ndarray, colours) -> np.ndarray:
    colours = np.asarray(colours, float)
    return colours[np.minimum((r * len(colours)).astype(int), len(colours) - 1)]


def blended(base: np.ndarray, colour, mask: np.ndarray) -> np.ndarray:
    out = base.copy()
    out[mask] = np.broadcast_to(np.asarray(colour, float), out.shape)[mask]
    return out


def shaded(rgb: np.ndarray, factor) -> np.ndarray:
    return rgb * np.asarray(factor, float)[..., None]


def with_trees(x, y, rgb, density: float, salt: int, scale: float = 7.0) -> np.ndarray:
    """Tree crowns over ``rgb`` where clustered noise exceeds 1 - density."""
    n = fbm(x, y, scale, salt)
    crown = n > 1 - density
    light = 0.8 + 0.5 * value_noise(x, y, 1.6, salt + 7)
    return blended(rgb, shaded(np.broadcast_to([46.0, 88.0, 44.0], rgb.shape), light), crown)


def _cars(x, y, rgb, prob: float, salt: int) -> np.ndarray:
    ix, iy, u, v = lots(x, y, 2.6, 5.2, salt)
    car = (hash2(ix, iy, salt + 1) < prob) & (np.abs(u - 0.5) < 0.34) & (np.abs(v - 0.5) < 0.4)
    colour = pick_palette(hash2(ix, iy, salt + 2), [(215, 215, 218), (40, 40, 46), (150, 30, 32), (60, 80, 140),
                                                (170, 170, 175), (235, 235, 235)])
    return blended(rgb, colour, car)


def ground_texture(x, y, base, grain: float, salt: int) -> np.ndarray:
    g = 1 + grain * (fbm(x, y, 3.0, salt) - 0.5)
    return shaded(np.broadcast_to(np.asarray(base, float), (len(x), 3)), g)


def tex_continuous(x, y):          # 11100: closed blocks of stone and zinc roofs around courtyards
    ix, iy, u, v = lots(x, y, 15, 12, 11)
    roof = pick_palette(hash2(ix, iy, 12), [(128, 133, 144), (100, 106, 118), (176, 170, 158), (186, 166, 136),
                                        (150, 146, 140)])
    rgb = shaded(roof, np.where(v < 0.5, 0.9, 1.06) * (1 + 0.06 * (value_noise(x, y, 1.0, 13) - 0.5)))
    rgb = blended(rgb, (74, 74, 78), (u < 0.05) | (v < 0.05))
    bx, by, bu, bv = lots(x, y, 60, 48, 14)
    court = (np.abs(bu - 0.5) < 0.17) & (np.abs(bv - 0.5) < 0.2)
    courtyard = with_trees(x, y, ground_texture(x, y, (156, 152, 140), 0.2, 15), 0.25, 16, 4.0)
    return blended(rgb, courtyard, court)


def tex_townhouses(x, y):          # 11210: terraced houses, gardens, some pools
    ix, iy, u, v = lots(x, y, 11, 26, 21)
    house = v < 0.42
    roof = pick_palette(hash2(ix, iy, 22), [(178, 96, 72), (160, 112, 86), (148, 82, 64), (120, 110, 104)])
    rgb = ground_texture(x, y, (94, 140, 70), 0.25, 23)
    rgb = with_trees(x, y, rgb, 0.35, 24, 5.0)
    pool = (hash2(ix, iy, 25) < 0.3) & (np.abs(u - 0.5) < 0.25) & (v > 0.7) & (v < 0.84)
    rgb = blended(rgb, (72, 172, 204), pool)
    rgb = blended(rgb, shaded(roof, np.where(v < 0.21, 0.88, 1.05)), house)
    return blended(rgb, (80, 78, 76), house & (u < 0.04))


def tex_estates(x, y):             # 11220: slab blocks with flat roofs, car parks, worn lawns
    ix, iy, u, v = lots(x, y, 72, 56, 31)
    turn = hash2(ix, iy, 32) < 0.5
    a, b = np.where(turn, v, u), np.where(turn, u, v)
    slab = (np.abs(a - 0.5) < 0.4) & (np.abs(b - 0.48) < 0.12)
    rgb = ground_texture(x, y, (140, 142, 98), 0.3, 33)
    rgb = with_trees(x, y, rgb, 0.12, 34, 6.0)
    park = b < 0.26
    lot = _cars(x, y, ground_texture(x, y, (98, 98, 100), 0.12, 35), 0.5, 36)
    rgb = blended(rgb, lot, park)
    vents = (value_noise(x, y, 1.5, 37) > 0.8)
    roof = shaded(np.broadcast_to([190.0, 190.0, 184.0], rgb.shape), np.where(vents, 0.7, 1.0))
    return blended(rgb, roof, slab)


def tex_houses(x, y, lx=22, ly=28, size=0.45, trees=0.35, pools=0.06, salt=41):   # 11230 / 11240
    ix, iy, u, v = lots(x, y, lx, ly, salt)
    du, dv = hash2(ix, iy, salt + 1) * (1 - size), hash2(ix, iy, salt + 2) * (1 - size)
    house = (u > du) & (u < du + size) & (v > dv) & (v < dv + size * 0.9)
    roof = pick_palette(hash2(ix, iy, salt + 3), [(186, 104, 76), (168, 120, 92), (112, 108, 106), (196, 130, 96)])
    rgb = with_trees(x, y, ground_texture(x, y, (108, 152, 80), 0.3, salt + 4), trees, salt + 5, 6.0)
    pool = ((hash2(ix, iy, salt + 6) < pools) & (np.abs(u - du - size / 2) < 0.12)
            & (v > dv + size) & (v < dv + size + 0.12))
    rgb = blended(rgb, (72, 172, 204), pool)
    return blended(rgb, shaded(roof, np.where(u < du + size / 2, 0.88, 1.05)), house)


def tex_industry(x, y):            # 12100: warehouses with ribbed metal roofs, yards, trucks
    ix, iy, u, v = lots(x, y, 95, 70, 51)
    hall = (u > 0.06) & (u < 0.86) & (v > 0.1) & (v < 0.72)
    roof = pick_palette(hash2(ix, iy, 52), [(206, 206, 210), (122, 140, 162), (192, 182, 160), (176, 178, 180)])
    ribs = 1 + 0.06 * np.sin(2 * math.pi * x / 2.4)
    yard = _cars(x, y, ground_texture(x, y, (112, 112, 108), 0.15, 53), 0.18, 54)
    truck = (hash2(np.floor(x / 4), np.floor(y / 14), 55) < 0.15) & (np.mod(x, 4) < 2.6)
    yard = blended(yard, (228, 228, 226), truck & (v > 0.76))
    return blended(yard, shaded(roof, ribs), hall)


def tex_motorway(x, y):            # 12210: dark asphalt, markings, dense traffic
    rgb = ground_texture(x, y, (62, 64, 67), 0.12, 61)
    marks = hash2(np.floor(x / 3), np.floor(y / 3), 62) < 0.05
    rgb = blended(rgb, (222, 222, 210), marks)
    return _cars(x, y, rgb, 0.3, 63)


def tex_street(x, y):              # 12220: asphalt, parked cars, street trees
    rgb = _cars(x, y, ground_texture(x, y, (90, 90, 92), 0.15, 71), 0.12, 72)
    return with_trees(x, y, rgb, 0.12, 73, 5.0)


def tex_railway(x, y):             # 12230: ballast and rails
    rgb = ground_texture(x, y, (126, 114, 100), 0.35, 81)
    rails = np.mod(x + y, 1.5) < 0.18
    return blended(rgb, (70, 62, 56), rails)


def tex_park(x, y):                # 14100: lawns, tree groves, paths
    rgb = ground_texture(x, y, (98, 148, 72), 0.25, 91)
    rgb = with_trees(x, y, rgb, 0.45, 92, 9.0)
    path = np.abs(np.sin(x / 37.0) + np.sin(y / 41.0)) < 0.04
    return blended(rgb, (200, 190, 162), path)


def tex_sports(x, y):              # 14200: stadiums, courts and tracks on pale concrete
    """Sports grounds read as sports grounds at a few metres a pixel: pitches of bright turf, red clay or
    blue hard courts, each ringed by a red track with wide white lines, on pale concrete and car parks
    (at 1 m or coarser a park-like green would make them indistinguishable from parks)."""
    ix, iy, u, v = lots(x, y, 96, 64, 101)
    rgb = _cars(x, y, ground_texture(x, y, (182, 178, 168), 0.15, 102), 0.12, 105)
    pitch = (np.abs(u - 0.5) < 0.36) & (np.abs(v - 0.5) < 0.30)
    track = (np.abs(u - 0.5) < 0.45) & (np.abs(v - 0.5) < 0.42) & ~pitch
    rgb = blended(rgb, (184, 82, 60), track)
    surface = pick_palette(hash2(ix, iy, 103), [(58, 168, 62), (58, 168, 62), (196, 104, 64), (62, 104, 170)])
    rgb = blended(rgb, shaded(surface, 1 + 0.1 * (fbm(x, y, 3.0, 104) - 0.5)), pitch)
    line = pitch & ((np.abs(np.abs(u - 0.5) - 0.34) < 0.02) | (np.abs(np.abs(v - 0.5) - 0.28) < 0.03)
                    | (np.abs(u - 0.5) < 0.015))
    return blended(rgb, (240, 240, 240), line)


def tex_fields(x, y):              # 21000 / 13400 / rural: crop fields with tractor lines
    ix, iy, u, v = lots(x, y, 230, 150, 111)
    crop = pick_palette(hash2(ix, iy, 112), [(206, 186, 120), (122, 156, 80), (152, 120, 88), (218, 198, 76),
                                         (176, 166, 110)])
    angle = hash2(ix, iy, 113) * math.pi
    lines = 1 + 0.08 * np.sin(2 * math.pi * (x * np.cos(angle) + y * np.sin(angle)) / 3.2)
    rgb = shaded(crop, lines * (1 + 0.1 * (fbm(x, y, 20, 114) - 0.5)))
    hedge = (u < 0.015) | (v < 0.02)
    return with_trees(x, y, blended(rgb, (70, 96, 52), hedge), 0.04, 115, 8.0)


def tex_pasture(x, y):             # 23000
    rgb = ground_texture(x, y, (132, 158, 88), 0.35, 121)
    ix, iy, u, v = lots(x, y, 120, 90, 122)
    return blended(rgb, (66, 96, 50), (u < 0.02) | (v < 0.025))


def tex_forest(x, y):              # 31000: dense crowns
    n = fbm(x, y, 4.0, 131)
    light = 0.65 + 0.7 * n
    return shaded(np.broadcast_to([44.0, 80.0, 42.0], (len(x), 3)), light)


def tex_water(x, y):               # 50000
    rgb = ground_texture(x, y, (40, 68, 94), 0.15, 141)
    return shaded(rgb, 1 + 0.05 * np.sin(x / 1.7 + 2 * value_noise(x, y, 10, 142)))


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
