"""Raw city images -> square patches, split by site (never by patch).

Layout read: ``<raw>/<City Name (IATA)>/<site>/<image>.jpg``. Every site but the last (sorted) of a
city is train; each image of the last site is cut into a left half (test) and a right half (val), and
each half is patched on its own, so no test patch overlaps a val patch. ``test_b`` is a fixed, seeded
sample of test patches per city. Offsets are always in full-image pixel coordinates.

Written: ``<patches>/<split>/<City Name (IATA)>/<site>__<imagestem>__y<y>_x<x>.jpg`` and
``<patches>/manifest.csv`` (one row per file; test_b files are hard links to the test ones).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .io import atomic_path, read_json, write_json

SPLITS = ("train", "val", "test", "test_b")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
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
        raise ValueError(f"city folder '{name}' is not named 'City Name (IATA)' with a 3-letter "
                         "upper-case code, e.g. 'Astana (NQZ)'; rename it")
    return m.group("name"), m.group("iata")


def _images(site_dir: Path) -> list[Path]:
    return sorted(p for p in site_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stable_seed(seed: int, text: str) -> list[int]:
    return [seed, zlib.crc32(text.encode())]


def plan_split(raw_dir: str | Path, size: int, stride: int, test_b_per_city: int, seed: int,
               strict: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Every patch to cut, as a manifest frame (MANIFEST_COLUMNS), plus the problems met.

    Image sizes come from file headers (nothing is decoded). A city folder with a bad name raises
    ValueError; an unreadable image is listed in the problems and skipped (raises when ``strict``).
    A city with one site has no train patches (listed as a problem).
    """
    raw_dir = Path(raw_dir)
    rows, problems, codes = [], [], {}
    for city_dir in _subdirs(raw_dir):
        _, iata = parse_city_folder(city_dir.name)
        if iata in codes:
            raise ValueError(f"IATA code {iata} used by both '{codes[iata]}' and '{city_dir.name}'; "
                             "give each city its own code")
        codes[iata] = city_dir.name
        sites = _subdirs(city_dir)
        if not sites:
            problems.append(f"{city_dir}: no site folders")
            continue
        if len(sites) == 1:
            problems.append(f"{city_dir}: one site only, so no train patches (the last site is test/val)")
        city_rows = []
        for si, site_dir in enumerate(sites):
            last = si == len(sites) - 1
            for img in _images(site_dir):
                try:
                    with Image.open(img) as im:
                        width, height = im.size
                except Exception as e:  # PIL raises several kinds for broken files
                    msg = f"{img}: unreadable image ({type(e).__name__}); replace or delete it"
                    if strict:
                        raise ValueError(msg) from None
                    problems.append(msg)
                    continue
                source = img.relative_to(raw_dir).as_posix()
                if not last:
                    parts = [("train", 0, width)]
                else:
                    half = width // 2
                    parts = [("test", 0, half), ("val", half, width - half)]
                for split, x0, w in parts:
                    for y, x in patch_grid(height, w, size, stride):
                        name = f"{site_dir.name}__{img.stem}__y{y}_x{x + x0}.jpg"
                        city_rows.append({"path": f"{split}/{city_dir.name}/{name}", "city": city_dir.name,
                                          "iata": iata, "site": site_dir.name, "source": source,
                                          "split": split, "y": y, "x": x + x0, "size": size})
        test = [r for r in city_rows if r["split"] == "test"]
        if test:
            rng = np.random.default_rng(_stable_seed(seed, iata))
            k = min(test_b_per_city, len(test))
            for i in sorted(rng.choice(len(test), size=k, replace=False)):
                r = dict(test[i])
                r["split"] = "test_b"
                r["path"] = "test_b/" + r["path"].split("/", 1)[1]
                city_rows.append(r)
        rows += city_rows
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.astype({"y": int, "x": int, "size": int}), problems


def _cut_source(job: tuple) -> int:
    """Write the missing patches of one source image; returns how many files were written."""
    src, out_dir, rows, quality = job
    out_dir = Path(out_dir)
    todo = [r for r in rows if not (out_dir / r[0]).exists()]
    if not todo:
        return 0
    cut = [r for r in todo if r[1] != "test_b"]
    if cut:
        with Image.open(src) as im:
            arr = np.asarray(im.convert("RGB"))
        for path, _, y, x, size in cut:
            with atomic_path(out_dir / path) as tmp:
                Image.fromarray(arr[y:y + size, x:x + size]).save(tmp, quality=quality)
    for path, _, _, _, _ in todo:
        if not path.startswith("test_b/"):
            continue
        target = out_dir / path
        original = out_dir / ("test/" + path.split("/", 1)[1])
        with atomic_path(target) as tmp:
            try:
                os.link(original, tmp)
            except OSError:
                shutil.copyfile(original, tmp)
    return len(todo)


def write_patches(plan: pd.DataFrame, raw_dir: str | Path, out_dir: str | Path, quality: int = 95,
                  workers: int = 1, progress: bool = True) -> int:
    """Cut and save every patch of ``plan`` that does not exist yet; returns the number written.

    Parallel over source images (each decoded once, each patch encoded once); files are written
    under a temporary name and renamed; existing files are left untouched.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    jobs = [(str(raw_dir / src), str(out_dir),
             list(g[["path", "split", "y", "x", "size"]].itertuples(index=False, name=None)), quality)
            for src, g in plan.groupby("source", sort=True)]
    bar = tqdm(total=len(jobs), desc="patches", unit="img", disable=not progress)
    written = 0
    if workers > 1 and len(jobs) > 1:
        with mp.get_context().Pool(min(workers, len(jobs))) as pool:
            for n in pool.imap_unordered(_cut_source, jobs):
                written += n
                bar.update()
    else:
        for job in jobs:
            written += _cut_source(job)
            bar.update()
    bar.close()
    return written


def reset_if_settings_changed(out_dir: str | Path, settings: dict) -> bool:
    """Keep ``out_dir`` only if it was made with the same ``settings``; else empty it. True if emptied.

    Patch file names hold only offsets, so patches cut with another size, stride, quality or
    sample would otherwise be taken for done.
    """
    out_dir = Path(out_dir)
    stamp = out_dir / "settings.json"
    if stamp.is_file() and read_json(stamp) == settings:
        return False
    emptied = out_dir.exists() and any(out_dir.iterdir())
    for split in SPLITS:
        if (out_dir / split).is_dir():
            shutil.rmtree(out_dir / split)
    (out_dir / "manifest.csv").unlink(missing_ok=True)
    write_json(stamp, settings)
    return emptied


def patches_dir(data_dir: str | Path) -> Path:
    """``<paths.data>/cities/patches``."""
    return Path(data_dir) / "cities" / "patches"


def read_manifest(data_dir: str | Path) -> pd.DataFrame:
    """The patch manifest under ``<data_dir>/cities/patches``; exits with a clear line if missing."""
    path = patches_dir(data_dir) / "manifest.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no patch manifest; run preprocessing.py first")
    df = pd.read_csv(path, dtype={"city": str, "iata": str, "site": str, "source": str, "split": str})
    missing = set(MANIFEST_COLUMNS) - set(df.columns)
    if missing:
        raise SystemExit(f"error: {path}: missing columns {sorted(missing)}; re-run preprocessing.py")
    return df


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The class order every stage uses: sorted IATA codes."""
    return sorted(manifest["iata"].unique())
