"""A city the classifier has never seen: which of the known cities does it look like?

The new city's images (any layout of image files under one folder, e.g. ``<site>/<image>``) are cut
the way preprocessing cuts the known ones: the same reader and 8-bit conversion (``rasters.convert``:
bands, scaling, ``cities.patch.ground_m``), the same patch grid over the whole image, the same blank-patch rule
(``cutting.blank_reason``) and the same JPEG encoding, kept in memory. The trained classifier embeds
every patch; the new city's mean embedding is compared (cosine) with each known city's mean test
embedding, and the share of its patches predicted as each known city is counted. Both carry a
percentile interval over resamples of the new city's source images (with replacement; the known
cities' means are held fixed), and ``first_share`` is the share of resamples in which a city ranks
first by similarity.

The cut must match the model's: ``cut_differences`` names any setting (bands, scaling, patch size,
ground size) or image property (bands used, ground resolution) in which the new images differ from
those the model was trained on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from rasterio.transform import Affine
from torch.utils.data import Dataset
from tqdm import tqdm

from ..core import runs
from ..core.errors import DataError
from . import data, rasters
from .cutting import blank_reason
from .intervals import resamples
from .patches import IMAGE_SUFFIXES, SIDECAR_SUFFIXES, patch_grid
from .similarity import class_means, cosine_similarity

CUT_KEYS = ("cities.image.bands", "cities.image.scale", "cities.image.scale_min", "cities.image.scale_max", "cities.patch.size", "cities.patch.ground_m")


GROUND_TOLERANCE = 1.5  # ground resolutions further apart than this factor cover different ground per patch


TABLE_COLUMNS = ["rank", "city", "iata", "similarity", "similarity_lo", "similarity_hi", "share_predicted",
                 "share_lo", "share_hi", "first_share"]


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (any depth), sorted; hidden files and folders left out."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def unused_files(folder: str | Path) -> list[Path]:
    """Files under ``folder`` that ``find_images`` does not take (a format the reader does not read),
    sorted; hidden files and GDAL's sidecar files (world files, .aux.xml) left out."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                  and not p.name.lower().endswith(SIDECAR_SUFFIXES)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@dataclass
class NewPatches:
    """The new city's kept patches: ``frame`` (source, y, x, size), their JPEG bytes in the same order,
    one ``rasters.convert`` record per image read, each georeferenced image's (crs, transform of the
    pixels as cut), and the problems met (unreadable, too small, not georeferenced when needed)."""
    frame: pd.DataFrame
    jpegs: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    georef: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    left_out: int = 0


def _georef(ds, out_width: int, out_height: int):
    """(crs, transform of the image resampled to out_width x out_height), None when not georeferenced."""
    if ds.crs is None or ds.transform.is_identity:
        return None
    return ds.crs, ds.transform * Affine.scale(ds.width / out_width, ds.height / out_height)


def cut_new(folder: str | Path, opts: dict, size: int, stride: int, max_nodata: float, quality: int,
            progress: bool = True) -> NewPatches:
    """Cut every image under ``folder`` into ``size`` patches at ``stride`` (``opts``: ``rasters.options``)."""
    folder = Path(folder)
    out = NewPatches(pd.DataFrame(columns=["source", "y", "x", "size"]))
    rows = []
    for img in tqdm(find_images(folder), desc="new city", unit="img", disable=not progress):
        source = img.relative_to(folder).as_posix()
        try:
            rgb, valid, info = rasters.convert(img, opts)
            with rasters.open_raster(img) as ds:
                georef = _georef(ds, info["out_width"], info["out_height"])
        except Exception as e:  # rasterio and Pillow raise several kinds for broken files
            out.problems.append(str(e) if isinstance(e, DataError)
                                else f"{img}: unreadable image ({type(e).__name__}); replace or delete it")
            continue
        if opts["ground_m"] is not None and info["res_m"] is None:
            out.problems.append(f"{img}: not georeferenced, so cities.patch.ground_m={opts['ground_m']} cannot be "
                                "applied; left out")
            continue
        grid = patch_grid(*rgb.shape[:2], size, stride)
        if not grid:
            out.problems.append(f"{img}: {rgb.shape[0]} x {rgb.shape[1]} px, smaller than cities.patch.size {size}; left out")
            continue
        out.sources.append({"source": source, **info})
        if georef is not None:
            out.georef[source] = georef
        for y, x in grid:
            if blank_reason(valid[y:y + size, x:x + size], rgb[y:y + size, x:x + size], max_nodata):
                out.left_out += 1
                continue
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(rgb[y:y + size, x:x + size])).save(buf, "JPEG", quality=quality)
            out.jpegs.append(buf.getvalue())
            rows.append((source, y, x, size))
    out.frame = pd.DataFrame(rows, columns=["source", "y", "x", "size"])
    return out


class JpegPatches(Dataset):
    """Patches held as JPEG bytes, decoded as training decodes its patch files (``data.read_image``)."""

    def __init__(self, jpegs: Sequence[bytes], transform=None, decode_size: int | None = None):
        self.jpegs, self.transform, self.decode_size = list(jpegs), transform, decode_size

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int):
        img = data.read_image(io.BytesIO(self.jpegs[i]), self.decode_size)
        return (self.transform(img) if self.transform is not None else img), 0


def patch_image(jpeg: bytes) -> np.ndarray:
    """One patch's JPEG bytes as an H x W x 3 uint8 array."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB"))


def cut_differences(trained: dict, cfg, known_sources: pd.DataFrame, new_sources: pd.DataFrame) -> list[str]:
    """How the new images' cut differs from the model's patches: ``<key> <now> (model: <then>)`` for each
    of CUT_KEYS whose value differs from the training patches' (``trained``: ``{"patches:<key>": value}``,
    as ``training.patch_settings`` gives it), then the bands used and the ground resolution (metres per
    pixel as cut, median over images) when they differ. [] = cut alike."""
    now = runs.settings(cfg, CUT_KEYS)
    out = [f"{k} {now[k]} (model: {trained[f'patches:{k}']})" for k in CUT_KEYS
           if f"patches:{k}" in trained and trained[f"patches:{k}"] != now[k]]
    known_bands, new_bands = set(known_sources["bands_used"].astype(str)), set(new_sources["bands_used"].astype(str))
    if new_bands - known_bands:
        out.append(f"bands used {', '.join(sorted(new_bands))} (model: {', '.join(sorted(known_bands))})")
    known_m, new_m = ground_resolution(known_sources), ground_resolution(new_sources)
    if known_m and new_m and max(known_m, new_m) / min(known_m, new_m) > GROUND_TOLERANCE:
        out.append(f"ground {new_m:g} m/px (model: {known_m:g} m/px)")
    return out


def ground_resolution(sources: pd.DataFrame) -> float | None:
    """Median metres per pixel of the images as cut (resampled ``ground_m``, else the file's ``res_m``);
    None when no image is georeferenced."""
    res = pd.to_numeric(sources["ground_m"], errors="coerce").fillna(pd.to_numeric(sources["res_m"], errors="coerce"))
    res = res.dropna()
    return round(float(res.median()), 4) if len(res) else None


def _scores(emb: np.ndarray, pred: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = cosine_similarity(np.vstack([emb.mean(axis=0), means]))[0, 1:]
    share = np.bincount(pred, minlength=len(means)) / len(pred)
    return sim, share


def rank_cities(new_emb: np.ndarray, new_pred: np.ndarray, groups: Sequence, known_emb: np.ndarray,
                known_labels: np.ndarray, classes: Sequence[str], names: Sequence[str] | None = None,
                n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """The known cities ranked by the cosine similarity of the new city's mean embedding to theirs
    (TABLE_COLUMNS, most similar first), with the share of new patches predicted as each and percentile
    intervals over ``n_boot`` resamples of the new city's source images (``groups``: one per patch)."""
    new_emb, new_pred, n = np.asarray(new_emb, float), np.asarray(new_pred), len(classes)
    means = class_means(known_emb, known_labels, n)
    sim, share = _scores(new_emb, new_pred, means)
    boot_sim, boot_share = [], []
    for r in resamples(np.zeros(len(new_emb), int), groups, n_boot, seed):
        s, p = _scores(new_emb[r], new_pred[r], means)
        boot_sim.append(s)
        boot_share.append(p)
    boot_sim, boot_share = np.asarray(boot_sim), np.asarray(boot_share)
    a = (1 - level) / 2
    first = np.bincount(boot_sim.argmax(axis=1), minlength=n) / len(boot_sim)
    table = pd.DataFrame({"city": list(names or classes), "iata": list(classes), "similarity": sim,
                          "similarity_lo": np.quantile(boot_sim, a, axis=0),
                          "similarity_hi": np.quantile(boot_sim, 1 - a, axis=0), "share_predicted": share,
                          "share_lo": np.quantile(boot_share, a, axis=0),
                          "share_hi": np.quantile(boot_share, 1 - a, axis=0), "first_share": first})
    table = table.sort_values(["similarity", "iata"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, n + 1))
    return table[TABLE_COLUMNS]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, float)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def nearest_city(new_emb: np.ndarray, known_emb: np.ndarray, known_labels: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per new patch, (index of the known city whose mean test embedding is closest by cosine, that cosine)."""
    sims = _unit(new_emb) @ _unit(np.nan_to_num(class_means(known_emb, known_labels, n_classes))).T
    return sims.argmax(axis=1), sims.max(axis=1)


def nearest_patches(new_emb: np.ndarray, picks: Sequence[int], known_emb: np.ndarray, known_labels: np.ndarray,
                    cities: Sequence[int]) -> np.ndarray:
    """``len(picks) x len(cities)`` indices into the known patches: for each picked new patch, the test
    patch of each of ``cities`` (class indices) nearest to it by cosine of the embeddings."""
    u_new, u_known, known_labels = _unit(np.asarray(new_emb)[list(picks)]), _unit(known_emb), np.asarray(known_labels)
    out = np.zeros((len(picks), len(cities)), int)
    for j, c in enumerate(cities):
        members = np.flatnonzero(known_labels == c)
        out[:, j] = members[(u_new @ u_known[members].T).argmax(axis=1)]
    return out


def pick_patches(groups: Sequence, k: int, seed: int) -> list[int]:
    """``k`` patch indices spread over the source images (round robin over images, a seeded patch of
    each), in order."""
    rng = np.random.default_rng([seed, 7201])
    by_image = [list(rng.permutation(np.flatnonzero(np.asarray(groups, dtype=object) == g)))
                for g in pd.unique(np.asarray(groups, dtype=object))]
    picks = []
    while len(picks) < k and any(by_image):
        for members in by_image:
            if members and len(picks) < k:
                picks.append(int(members.pop()))
    return sorted(picks)


def footprints(frame: pd.DataFrame, georef: dict):
    """A GeoDataFrame of the patches of georeferenced images (each patch's footprint, columns of
    ``frame``), in the CRS of the first such image (others reprojected); None when none is georeferenced."""
    if not georef:
        return None
    import geopandas as gpd
    from shapely.geometry import Polygon

    parts = []
    for source, rows in frame[frame["source"].isin(georef)].groupby("source", sort=True):
        crs, t = georef[source]
        polys = [Polygon([t * (x, y), t * (x + s, y), t * (x + s, y + s), t * (x, y + s)])
                 for y, x, s in rows[["y", "x", "size"]].itertuples(index=False)]
        parts.append(gpd.GeoDataFrame(rows, geometry=polys, crs=crs))
    if not parts:
        return None
    crs = parts[0].crs
    return gpd.GeoDataFrame(pd.concat([p.to_crs(crs) for p in parts]), crs=crs)


KNOWN = "known_embeddings.npz"  # in <results>/cities/new: the known test patches' embeddings, reused


def known_key(checkpoint: str | Path, split: str, files: Sequence[str], *extra) -> str:
    """What the known embeddings depend on: the checkpoint file (path, size, time), the split and its
    files, and ``extra`` (device, precision)."""
    import hashlib
    import json

    st = Path(checkpoint).stat()
    text = json.dumps([str(checkpoint), st.st_size, st.st_mtime_ns, split, list(map(str, files)), *map(str, extra)])
    return hashlib.sha256(text.encode()).hexdigest()


def read_known(path: str | Path, key: str) -> np.ndarray | None:
    """The cached embeddings at ``path`` when they were made under ``key``, else None."""
    try:
        with np.load(path) as f:
            return f["embeddings"] if str(f["key"]) == key else None
    except (OSError, KeyError, ValueError):
        return None


def write_known(path: str | Path, key: str, embeddings: np.ndarray) -> None:
    from ..core.files import atomic_path

    with atomic_path(path) as tmp:
        np.savez(tmp, key=np.array(key), embeddings=embeddings.astype(np.float32))
