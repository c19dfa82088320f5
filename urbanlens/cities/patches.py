"""Raw city images -> square patches, split by site (never by patch).

Layout read: ``<raw>/<City Name (IATA)>/<site>/<image>.jpg``. Every site but the last (sorted) of a
city is train; each image of the last site is cut into a left half (test) and a right half (val), and
each half is patched on its own, so no test patch overlaps a val patch. ``test_b`` is a fixed, seeded
sample of test patches per city. Offsets are always in full-image pixel coordinates.

Images are any raster rasterio reads (urbanlens/cities/rasters.py converts each to 8-bit RGB, resampled
to ``cities.patch.ground_m`` when set); offsets are in the pixels of that converted image.

Written: ``<patches>/<split>/<City Name (IATA)>/<site>__<imagestem>__y<y>_x<x>.jpg``,
``<patches>/manifest.csv`` (one row per file; test_b files are hard links to the test ones) and
``<patches>/sources.csv`` (one row per source image: how it was read and scaled, see urbanlens/cities/cutting.py).
"""
from __future__ import annotations

import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import outputs, runs
from ..core.errors import DataError
from ..core.schema import SPLITS
from . import rasters

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2")


MANIFEST_COLUMNS = ["path", "city", "iata", "site", "source", "split", "y", "x", "size"]


_CITY_RE = re.compile(r"^(?P<name>\S.*?)\s*\((?P<iata>[A-Z]{3})\)$")


def patch_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (y, x) offsets of every full ``size`` patch at ``stride`` (row-major); [] if none fits."""
    if size <= 0 or stride <= 0:
        raise ValueError(f"patch size and stride must be positive, got {size} and {stride}")
    ys = range(0, height - size + 1, stride)
    xs = range(0, width - size + 1, stride)
    return [(y, x) for y in ys for x in xs]


def parse_city_folder(name: str) -> tuple[str, str]:
    """``"Astana (NQZ)"`` -> ``("Astana", "NQZ")``; anything else raises ValueError saying the form."""
    m = _CITY_RE.match(name.strip())
    if not m:
        raise DataError(f"city folder '{name}' is not named 'City Name (IATA)' with a 3-letter "
                         "upper-case code, e.g. 'Astana (NQZ)'; rename it")
    return m.group("name"), m.group("iata")


def _images(site_dir: Path) -> list[Path]:
    return sorted(p for p in site_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


# files GDAL reads beside an image (georeference, statistics, overviews, masks): used, though not listed
SIDECAR_SUFFIXES = (".aux.xml", ".tfw", ".tifw", ".tiffw", ".jgw", ".jpgw", ".pgw", ".pngw", ".j2w", ".wld", ".prj",
                    ".ovr", ".msk")


def unused_inputs(raw_dir: str | Path) -> list[str]:
    """What ``plan_split`` does not read under ``raw_dir``, one line per reason (count, first file): a
    file loose in the raw folder or in a city folder, a file in a folder nested inside a site folder, a
    file of a format the reader does not take. Hidden files and GDAL's sidecar files are not listed."""
    raw_dir = Path(raw_dir)
    found: dict[str, list[Path]] = {}
    visible = lambda p: not p.name.startswith(".")  # noqa: E731
    for entry in filter(visible, sorted(raw_dir.iterdir())):
        if not entry.is_dir():
            found.setdefault("loose in the raw folder (images go in <City Name (IATA)>/<site>/)", []).append(entry)
            continue
        for sub in filter(visible, sorted(entry.iterdir())):
            if not sub.is_dir():
                found.setdefault("loose in a city folder, outside its site folders (move them into a site "
                                 "folder)", []).append(sub)
                continue
            for f in sorted(sub.rglob("*")):
                if f.is_dir() or any(part.startswith(".") for part in f.relative_to(sub).parts):
                    continue
                if f.parent != sub:
                    found.setdefault("in a folder nested inside a site folder (only the site folder's own files "
                                     "are read: move them up)", []).append(f)
                elif f.suffix.lower() not in IMAGE_SUFFIXES and not f.name.lower().endswith(SIDECAR_SUFFIXES):
                    found.setdefault(f"of a format the reader does not take (it takes {', '.join(IMAGE_SUFFIXES)}: "
                                     "convert them)", []).append(f)
    return [f"{len(files)} file(s) {why}, not used: {files[0]}" + (f" and {len(files) - 1} more" if len(files) > 1
                                                                    else "") for why, files in found.items()]


def _refuse_twins(names: list[str], folder: Path, what: str) -> None:
    """DataError naming two of ``names`` that are the same but for case (on a case-insensitive disk,
    or once patch names are made, they would be one)."""
    seen: dict[str, str] = {}
    for name in names:
        twin = seen.setdefault(name.casefold(), name)
        if twin != name:
            raise DataError(folder, f"{what} '{twin}' and '{name}' differ only by case",
                            "merge them into one or rename one")


def _stable_seed(seed: int, text: str) -> list[int]:
    return [seed, zlib.crc32(text.encode())]


def plan_split(raw_dir: str | Path, size: int, stride: int, test_b_per_city: int, seed: int,
               strict: bool = False, ground_m: float | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every patch to cut, as a manifest frame (MANIFEST_COLUMNS), plus the problems met.

    Image sizes come from file headers (rasterio; nothing is decoded); with ``ground_m`` they are the
    sizes resampled to that ground resolution, and offsets are in those pixels. A city folder with a bad
    name raises DataError. These are listed in the problems and left out (``strict``: DataError at the
    first): an unreadable image, an image without georeference when ``ground_m`` is set, an image too
    small for one patch per split part, a city with fewer than two sites (the split needs train sites
    and a test/val site) or without a usable image for a split.
    """
    raw_dir = Path(raw_dir)
    rows, problems, codes = [], [], {}

    def problem(msg: str) -> None:
        if strict:
            raise DataError(msg)
        problems.append(msg)

    for city_dir in _subdirs(raw_dir):
        _, iata = parse_city_folder(city_dir.name)
        if iata in codes:
            raise DataError(f"IATA code {iata} used by both '{codes[iata]}' and '{city_dir.name}'; "
                             "give each city its own code")
        codes[iata] = city_dir.name
        sites = _subdirs(city_dir)
        _refuse_twins([s.name for s in sites], city_dir, "site folders")
        if len(sites) < 2:
            problem(f"{city_dir}: {len(sites)} site folder(s), the split needs 2 or more (train sites, then "
                    "one test/val site); city left out: add a site folder or remove the city")
            continue
        city_rows = []
        for si, site_dir in enumerate(sites):
            last = si == len(sites) - 1
            images = _images(site_dir)
            stems = Counter(p.stem.casefold() for p in images)
            for img in images:
                # a.tif beside a.png: the suffix goes into the patch names, or one would overwrite the other
                label = img.name if stems[img.stem.casefold()] > 1 else img.stem
                try:
                    head = rasters.header(img, ground_m)
                except Exception as e:  # rasterio raises RasterioIOError and others for broken files
                    problem(f"{img}: unreadable image ({type(e).__name__}); replace or delete it")
                    continue
                if ground_m is not None and head["res_m"] is None:
                    problem(f"{img}: not georeferenced, so cities.patch.ground_m={ground_m} cannot be applied; left out: "
                            "give it a georeference (e.g. a world file) or set cities.patch.ground_m to null")
                    continue
                width, height = head["out_width"], head["out_height"]
                source = img.relative_to(raw_dir).as_posix()
                if not last:
                    parts = [("train", 0, width)]
                else:
                    half = width // 2
                    parts = [("test", 0, half), ("val", half, width - half)]
                if any(not patch_grid(height, w, size, stride) for _, _, w in parts):
                    need = f"{size} x {2 * size if last else size}"
                    problem(f"{img}: {height} x {width} px, too small for cities.patch.size {size} (this site needs "
                            f"at least {need} px, height x width); left out: lower cities.patch.size or remove it")
                    continue
                for split, x0, w in parts:
                    for y, x in patch_grid(height, w, size, stride):
                        name = f"{site_dir.name}__{label}__y{y}_x{x + x0}.jpg"
                        city_rows.append({"path": f"{split}/{city_dir.name}/{name}", "city": city_dir.name,
                                          "iata": iata, "site": site_dir.name, "source": source,
                                          "split": split, "y": y, "x": x + x0, "size": size})
        lacking = [s for s in ("train", "val", "test") if not any(r["split"] == s for r in city_rows)]
        if lacking:
            where = "the train sites" if "train" in lacking else f"the last site ({sites[-1].name})"
            problem(f"{city_dir}: no {'/'.join(lacking)} patches (no usable image in {where}); city left out: "
                    "add images or remove the city")
            continue
        rows += city_rows
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype({"y": int, "x": int, "size": int})
    return add_test_b(df, test_b_per_city, seed), problems


def add_test_b(plan: pd.DataFrame, per_city: int, seed: int) -> pd.DataFrame:
    """``plan`` with its test_b rows (a seeded sample of ``per_city`` test rows of each city, all of
    them when fewer) put after each city's rows; test_b rows already in ``plan`` are replaced."""
    plan = plan[plan["split"] != "test_b"]
    out = []
    for iata, rows in plan.groupby("iata", sort=False):
        out.append(rows)
        test = rows[rows["split"] == "test"]
        if per_city <= 0 or test.empty:
            continue
        rng = np.random.default_rng(_stable_seed(seed, iata))
        pick = test.iloc[sorted(rng.choice(len(test), size=min(per_city, len(test)), replace=False))].copy()
        pick["split"] = "test_b"
        pick["path"] = "test_b/" + pick["path"].str.split("/", n=1).str[1]
        out.append(pick)
    if not out:
        return plan.reset_index(drop=True)
    return pd.concat(out, ignore_index=True)


def incomplete_cities(plan: pd.DataFrame) -> dict[str, list[str]]:
    """``{city folder: [splits it has no patch of]}`` among train, val and test."""
    have = plan.groupby("city")["split"].agg(set)
    return {c: [s for s in ("train", "val", "test") if s not in splits] for c, splits in have.items()
            if not {"train", "val", "test"} <= splits}


def resolution_spread(sources: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """(largest / smallest median ground resolution over cities, {iata: median m/px}) of the
    georeferenced images of a sources table (columns iata, res_m); (1.0, {}) when fewer than two."""
    known = sources.dropna(subset=["res_m"])
    per_city = known.groupby("iata")["res_m"].median().round(4).to_dict()
    if len(per_city) < 2:
        return 1.0, per_city
    return max(per_city.values()) / min(per_city.values()), per_city


def write_patches(plan: pd.DataFrame, raw_dir: str | Path, out_dir: str | Path, quality: int = 95,
                  workers: int = 1, progress: bool = True, failed: dict | None = None,
                  image: dict | None = None) -> int:
    """Cut and save every patch of ``plan`` that does not exist yet, test_b as links to test; returns
    the number written (``cutting.cut`` without leaving blank patches out). A source image that cannot
    be decoded gives no patch: ``failed[source] = problem line`` (DataError when ``failed`` is None)."""
    from . import cutting

    res = cutting.cut(plan, raw_dir, out_dir, image or rasters.DEFAULTS, max_nodata=1.0, quality=quality,
                      workers=workers, progress=progress, drop_constant=False)
    if res.failed and failed is None:
        raise DataError(res.failed[min(res.failed)])
    if failed is not None:
        failed.update(sorted(res.failed.items()))
    kept = plan[~plan["source"].isin(res.failed)]
    return res.written + cutting.link_test_b(kept, out_dir)


RUN_KEYS = ("cities.image", "cities.patch", "cities.split.test_b_per_city", "seed")  # what makes a patch and decides the split


SOURCES = "sources.csv"  # per source image: dtype, bands used, scaling limits, ground resolution, patches kept


STAMP = "preprocessing.stamp.json"  # the run stamp (urbanlens.core.runs) beside the patches


def has_patches(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a manifest or any file of a split."""
    out_dir = Path(out_dir)
    return (out_dir / "manifest.csv").is_file() or any(
        (out_dir / s).is_dir() and any((out_dir / s).iterdir()) for s in SPLITS)


def patch_changes(out_dir: str | Path, cfg, sources: dict[str, dict]) -> list[str]:
    """What makes the patches in ``out_dir`` not this run's: changed ``RUN_KEYS`` or a modified source
    image (``sources``: ``runs.fingerprint`` of the images cut). [] when there is no patch yet. Patch
    names hold only offsets, so patches of other settings would otherwise be taken for done; an added
    or removed source image only adds or drops its own patches (the manifest is written anew)."""
    if not has_patches(out_dir):
        return []
    return runs.compare(Path(out_dir) / STAMP, cfg, RUN_KEYS, sources, kinds=("modified",))


def clear_patches(out_dir: str | Path) -> None:
    """Remove every split folder and the manifest of ``out_dir`` (its stamp and config stay)."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)
    (out_dir / "manifest.csv").unlink(missing_ok=True)
    (out_dir / SOURCES).unlink(missing_ok=True)


def prune(out_dir: str | Path, manifest: pd.DataFrame) -> int:
    """Remove the patch files under the split folders of ``out_dir`` that ``manifest`` does not list
    (left from an earlier split or left out as blank now); returns how many."""
    out_dir, keep, n = Path(out_dir), set(manifest["path"]), 0
    for split in SPLITS:
        for f in sorted((out_dir / split).rglob("*.jpg")) if (out_dir / split).is_dir() else []:
            if f.relative_to(out_dir).as_posix() not in keep:
                f.unlink()
                n += 1
    return n


def patches_dir(data_dir: str | Path) -> Path:
    """``<paths.data>/cities/patches``."""
    return Path(data_dir) / "cities" / "patches"


def read_manifest(data_dir: str | Path) -> pd.DataFrame:
    """The patch manifest under ``<data_dir>/cities/patches``; a missing, damaged or empty one is one
    line naming it and preprocessing.py."""
    path = patches_dir(data_dir) / "manifest.csv"
    if not path.exists():
        raise DataError(f"{path}: no patch manifest; run preprocessing.py first")
    df = outputs.read_csv(path, "preprocessing.py", MANIFEST_COLUMNS,
                          dtype={"city": str, "iata": str, "site": str, "source": str, "split": str})
    if df.empty:
        raise outputs.damaged(path, "preprocessing.py", "lists no patch")
    return df


def class_names(manifest: pd.DataFrame, where: str | Path = "patch manifest") -> list[str]:
    """The class order every stage uses: sorted IATA codes; DataError when there are fewer than two (a
    classifier of one city learns nothing, yet would score 100 %)."""
    classes = sorted(manifest["iata"].unique())
    if len(classes) < 2:
        raise DataError(where, f"patches of {len(classes)} city ({', '.join(classes) or 'none'}); telling cities "
                        "apart needs 2 or more", "add city folders under cities/raw and re-run preprocessing.py")
    return classes
