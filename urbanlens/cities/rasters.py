"""Any raster a user has (GeoTIFF, JPEG 2000, PNG, JPEG) -> the 8-bit RGB array patches are cut from.

Read through rasterio: 8/16-bit integers and floats, 1, 3, 4 or more bands, pixel- or band-interleaved.

- Bands (``cities.image.bands``): a list of 1-based band numbers, else the bands tagged red, green and blue
  (GDAL colour interpretation), else the first three; an image with fewer than three bands repeats its
  first band (panchromatic -> grey RGB).
- Nodata: the file's own mask (internal mask, alpha band or declared nodata value; a pixel is a hole
  only where every band used is, as GDAL's per-band nodata masks say) and NaN in any band used.
- Scaling to 8 bits (``cities.image.scale``): ``auto`` (default) is ``none`` for uint8 images and
  ``percentile`` otherwise; ``percentile`` maps each band's 2nd..98th percentile over the valid pixels
  of the image to 0..255; ``fixed`` maps ``cities.image.scale_min``..``cities.image.scale_max``; ``none`` takes 8-bit
  values as they are and refuses any other type. Values beyond the limits become 0 or 255: with
  ``percentile`` about 2 % of pixels a band at each end. The limits used are returned (and recorded
  per source image by preprocessing), so nothing is clipped unseen. Holes are 0.
- Ground (``cities.patch.ground_m``): a georeferenced image is resampled (average when shrinking, bilinear when
  enlarging) to that many metres per pixel, so patches of every city cover the same ground.

Baseline JPEG files read at their own resolution are decoded by Pillow (its chroma upsampling; GDAL's
JPEG driver skips it, which shifts edge pixels by up to ~60 levels), so JPEG worlds cut as before.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning

from ..core.errors import ConfigError, DataError
from ..core.schema import SCALES

PERCENTILES = (2.0, 98.0)


DEFAULTS = {"bands": None, "scale": "auto", "scale_min": None, "scale_max": None, "ground_m": None}


def options(cfg) -> dict:
    """The reading options of a config (``image`` section and ``cities.patch.ground_m``), checked."""
    img = cfg.cities.image
    if img.scale not in SCALES:
        raise ConfigError(f"cities.image.scale: '{img.scale}' is not one of {', '.join(SCALES)}; pick one")
    if img.scale == "fixed" and (img.scale_min is None or img.scale_max is None or img.scale_max <= img.scale_min):
        raise ConfigError(f"cities.image.scale fixed needs cities.image.scale_min < cities.image.scale_max, got {img.scale_min} and "
                          f"{img.scale_max}; set both, e.g. --set cities.image.scale_min=0 --set cities.image.scale_max=2047")
    bands = list(img.bands) if img.bands is not None else None
    if bands is not None and (not bands or any(not isinstance(b, int) or b < 1 for b in bands)):
        raise ConfigError(f"cities.image.bands: {img.bands} must be a list of 1-based band numbers, e.g. [3, 2, 1]")
    ground = cfg.cities.patch.ground_m
    if ground is not None and not ground > 0:
        raise ConfigError(f"cities.patch.ground_m must be > 0 metres per pixel or null, got {ground}")
    return {"bands": bands, "scale": img.scale, "scale_min": img.scale_min, "scale_max": img.scale_max,
            "ground_m": ground}


def open_raster(path: str | Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def resolution_m(ds) -> float | None:
    """Ground size of a pixel in metres (mean of x and y), None when the image is not georeferenced."""
    if ds.crs is None or ds.transform.is_identity:
        return None
    rx, ry = abs(ds.transform.a), abs(ds.transform.e)
    if ds.crs.is_projected:
        f = ds.crs.linear_units_factor[1]
        return float((rx + ry) / 2 * f)
    lat = math.radians(ds.xy(ds.height // 2, ds.width // 2)[1])  # degrees: metres at the centre
    return float((rx * 111_320 * math.cos(lat) + ry * 110_574) / 2)


def choose_bands(colorinterp, count: int, bands: list[int] | None, where: str = "") -> list[int]:
    """1-based band numbers to read as red, green, blue (see the module text)."""
    if bands is not None:
        bad = [b for b in bands if b > count]
        if bad:
            raise DataError(f"{where}: cities.image.bands {bands} asks for band {bad[0]} of a {count}-band image; "
                            "set cities.image.bands to bands it has, or null")
        return (bands * 3)[:3] if len(bands) < 3 else bands[:3]
    tags = {ci: i + 1 for i, ci in reversed(list(enumerate(colorinterp)))}
    if all(c in tags for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return [tags[ColorInterp.red], tags[ColorInterp.green], tags[ColorInterp.blue]]
    return [1, 2, 3] if count >= 3 else [1, 1, 1]


def header(path: str | Path, ground_m: float | None = None) -> dict:
    """What an image is, from its header (nothing decoded): width, height, dtype, count, res_m, and the
    size it is cut at (out_width, out_height: resampled to ``ground_m`` when both are known)."""
    with open_raster(path) as ds:
        res = resolution_m(ds)
        h = {"width": ds.width, "height": ds.height, "dtype": ds.dtypes[0], "count": ds.count, "res_m": res,
             "driver": ds.driver}
    h["out_width"], h["out_height"] = out_size(h["width"], h["height"], res, ground_m)
    return h


def out_size(width: int, height: int, res_m: float | None, ground_m: float | None) -> tuple[int, int]:
    """Pixel size of the image resampled from ``res_m`` to ``ground_m`` metres per pixel."""
    if ground_m is None or res_m is None or math.isclose(res_m, ground_m, rel_tol=1e-6):
        return width, height
    f = res_m / ground_m
    return max(1, round(width * f)), max(1, round(height * f))


def _read(path: Path, ds, idx: list[int], out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x bands values, pixel-interleaved as patches are encoded, H x W valid mask) of the bands
    ``idx`` at ``out_shape``."""
    same = out_shape == (ds.height, ds.width)
    if ds.driver == "JPEG" and same:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if idx != list(range(1, arr.shape[-1] + 1)):  # as decoded when the bands are the file's own order
            arr = arr[..., [i - 1 for i in idx]]
        return arr, np.ones(out_shape, bool)
    shrink = out_shape[0] < ds.height
    kw = {} if same else {"out_shape": out_shape,
                          "resampling": Resampling.average if shrink else Resampling.bilinear}
    unique = sorted(set(idx))
    data = ds.read(unique, **kw)
    masks = ds.read_masks(unique, **({} if same else {"out_shape": out_shape, "resampling": Resampling.nearest}))
    valid = (masks > 0).any(axis=0)
    if data.dtype.kind == "f":
        valid &= ~np.isnan(data).any(axis=0)
    pos = {b: i for i, b in enumerate(unique)}
    return np.stack([data[pos[b]] for b in idx], axis=-1), valid


def stretch_limits(values: np.ndarray, valid: np.ndarray, scale: str, scale_min=None, scale_max=None
                   ) -> list[tuple[float, float]] | None:
    """Per band (lo, hi) mapped to 0..255, or None for ``none``; ``values`` H x W x bands."""
    if scale == "none":
        return None
    if scale == "fixed":
        return [(float(scale_min), float(scale_max))] * values.shape[-1]
    out = []
    for i in range(values.shape[-1]):
        v = values[..., i][valid]
        lo, hi = (np.percentile(v, PERCENTILES) if v.size else (0.0, 1.0))
        out.append((float(lo), float(hi)))
    return out


def to_uint8(values: np.ndarray, valid: np.ndarray, limits) -> np.ndarray:
    """H x W x 3 uint8 (C-contiguous, so a patch is a cheap slice): each band of the H x W x 3
    ``values`` mapped linearly from its (lo, hi) to 0..255, clipped; holes 0. 8-bit values taken as
    they are (``limits`` None) are not copied when they need no change."""
    if limits is None:
        out = np.ascontiguousarray(values, dtype=np.uint8)
    else:
        out = np.empty(values.shape, np.uint8)
        for i, (lo, hi) in enumerate(limits):
            scaled = (values[..., i].astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
            out[..., i] = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
    if not valid.all():
        out = np.where(valid[..., None], out, np.uint8(0))
    return out


def saturated_share(rgb: np.ndarray, valid: np.ndarray) -> float:
    """Share of the valid pixels of an H x W x 3 uint8 image at 255 in some band."""
    sat = (rgb[..., 0] == 255) | (rgb[..., 1] == 255) | (rgb[..., 2] == 255)
    return float(np.count_nonzero(sat & valid)) / max(int(np.count_nonzero(valid)), 1)


def convert(path: str | Path, opts: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(H x W x 3 uint8 RGB, H x W valid mask, what was done) for one image; ``opts`` from ``options``.

    The record: dtype, bands (count), bands_used, scale, limits, res_m, ground_m, width, height,
    out_width, out_height, nodata_share, saturated_share (valid pixels at 255 in some band)."""
    path = Path(path)
    with open_raster(path) as ds:
        idx = choose_bands(ds.colorinterp, ds.count, opts["bands"], str(path))
        res = resolution_m(ds)
        ow, oh = out_size(ds.width, ds.height, res, opts["ground_m"])
        dtype = ds.dtypes[idx[0] - 1]
        scale = opts["scale"]
        if scale == "auto":
            scale = "none" if dtype == "uint8" else "percentile"
        if scale == "none" and dtype != "uint8":
            raise DataError(f"{path}: {dtype} image with cities.image.scale none (8-bit only); set cities.image.scale to auto, "
                            "percentile or fixed (with cities.image.scale_min and cities.image.scale_max)")
        values, valid = _read(path, ds, idx, (oh, ow))
        width, height, count = ds.width, ds.height, ds.count
    limits = stretch_limits(values, valid, scale, opts["scale_min"], opts["scale_max"])
    rgb = to_uint8(values, valid, limits)
    n_valid = int(np.count_nonzero(valid))
    info = {"dtype": dtype, "bands": count, "bands_used": ",".join(map(str, idx)), "scale": scale,
            "limits": "" if limits is None else ";".join(f"{lo:.6g}..{hi:.6g}" for lo, hi in limits),
            "res_m": res, "ground_m": opts["ground_m"] if (ow, oh) != (width, height) else None,
            "width": width, "height": height, "out_width": ow, "out_height": oh,
            "nodata_share": round(1 - n_valid / valid.size, 6),
            "saturated_share": round(saturated_share(rgb, valid), 6)}
    return rgb, valid, info
