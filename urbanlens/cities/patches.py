"""Raw city images -> square patches, split by site (never by patch).

Layout read: ``<raw>/<City Name (IATA)>/<site>/<image>.jpg``. Every site but the last (sorted) of a
city is train; each image of the last site is cut into a left half (test) and a right half (val), and
each half is patched on its own, so no test patch overlaps a val patch. ``test_b`` is a fixed, seeded
sample of test patches per city. Offsets are always in full-image pixel coordinates.

Written: ``<patches>/<split>/<City Name (IATA)>/<site>__<imagestem>__y<y>_x<x>.jpg`` and
``<patches>/manifest.csv`` (one row per file; test_b files are hard links to the test ones).
"""
from __future__ import annotations

import contextlib
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

from ..core import runs
from ..core.errors import DataError
from ..core.files import atomic_path

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
        raise DataError(f"city folder '{name}' is not named 'City Name (IATA)' with a 3-letter "
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
    ValueError. These are listed in the problems and left out (``strict``: ValueError at the first):
    an unreadable image, an image too small for one patch per split part, a city with fewer than two
    sites (the split needs train sites and a test/val site) or without a usable image for a split.
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
        if len(sites) < 2:
            problem(f"{city_dir}: {len(sites)} site folder(s), the split needs 2 or more (train sites, then "
                    "one test/val site); city left out: add a site folder or remove the city")
            continue
        city_rows = []
        for si, site_dir in enumerate(sites):
            last = si == len(sites) - 1
            for img in _images(site_dir):
                try:
                    with Image.open(img) as im:
                        width, height = im.size
                except Exception as e:  # PIL raises several kinds for broken files
                    problem(f"{img}: unreadable image ({type(e).__name__}); replace or delete it")
                    continue
                source = img.relative_to(raw_dir).as_posix()
                if not last:
                    parts = [("train", 0, width)]
                else:
                    half = width // 2
                    parts = [("test", 0, half), ("val", half, width - half)]
                if any(not patch_grid(height, w, size, stride) for _, _, w in parts):
                    need = f"{size} x {2 * size if last else size}"
                    problem(f"{img}: {height} x {width} px, too small for patch.size {size} (this site needs "
                            f"at least {need} px, height x width); left out: lower patch.size or remove it")
                    continue
                for split, x0, w in parts:
                    for y, x in patch_grid(height, w, size, stride):
                        name = f"{site_dir.name}__{img.stem}__y{y}_x{x + x0}.jpg"
                        city_rows.append({"path": f"{split}/{city_dir.name}/{name}", "city": city_dir.name,
                                          "iata": iata, "site": site_dir.name, "source": source,
                                          "split": split, "y": y, "x": x + x0, "size": size})
        lacking = [s for s in ("train", "val", "test") if not any(r["split"] == s for r in city_rows)]
        if lacking:
            where = "the train sites" if "train" in lacking else f"the last site ({sites[-1].name})"
            problem(f"{city_dir}: no {'/'.join(lacking)} patches (no usable image in {where}); city left out: "
                    "add images or remove the city")
            continue
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


def _cut_source(job: tuple) -> tuple[int, str | None]:
    """Write the missing patches of one source image; returns (files written, problem or None).

    An image that cannot be decoded (truncated, corrupt) writes nothing and returns its problem."""
    src, out_dir, rows, quality = job
    out_dir = Path(out_dir)
    todo = [r for r in rows if not (out_dir / r[0]).exists()]
    if not todo:
        return 0, None
    cut = [r for r in todo if r[1] != "test_b"]
    if cut:
        try:
            with Image.open(src) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
            return 0, f"{src}: unreadable image ({reason}); replace or delete it"
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
    return len(todo), None


def write_patches(plan: pd.DataFrame, raw_dir: str | Path, out_dir: str | Path, quality: int = 95,
                  workers: int = 1, progress: bool = True, failed: dict | None = None) -> int:
    """Cut and save every patch of ``plan`` that does not exist yet; returns the number written.

    Parallel over source images (each decoded once, each patch encoded once); files are written
    under a temporary name and renamed; existing files are left untouched. A source image that cannot
    be decoded gives no patch: ``failed[source] = problem line`` (ValueError when ``failed`` is None).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    jobs = [(str(raw_dir / src), str(out_dir),
             list(g[["path", "split", "y", "x", "size"]].itertuples(index=False, name=None)), quality)
            for src, g in plan.groupby("source", sort=True)]
    sources = [src for src, _ in plan.groupby("source", sort=True)]
    bar = tqdm(total=len(jobs), desc="patches", unit="img", disable=not progress)
    written, problems = 0, {}
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(mp.get_context().Pool(min(workers, len(jobs))))
            results = pool.imap(_cut_source, jobs)  # in job order, so each result meets its source
        else:
            results = map(_cut_source, jobs)
        for source, (n, problem) in zip(sources, results):
            written += n
            if problem:
                problems[source] = problem
            bar.update()
    bar.close()
    if problems and failed is None:
        raise DataError(problems[min(problems)])
    if failed is not None:
        failed.update(sorted(problems.items()))
    return written


RUN_KEYS = ("patch.size", "patch.stride", "patch.jpeg_quality", "split.test_b_per_city", "seed")  # what makes a patch


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


def patches_dir(data_dir: str | Path) -> Path:
    """``<paths.data>/cities/patches``."""
    return Path(data_dir) / "cities" / "patches"


def read_manifest(data_dir: str | Path) -> pd.DataFrame:
    """The patch manifest under ``<data_dir>/cities/patches``; exits with a clear line if missing."""
    path = patches_dir(data_dir) / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{path}: no patch manifest; run preprocessing.py first")
    df = pd.read_csv(path, dtype={"city": str, "iata": str, "site": str, "source": str, "split": str})
    missing = set(MANIFEST_COLUMNS) - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; re-run preprocessing.py")
    return df


def class_names(manifest: pd.DataFrame) -> list[str]:
    """The class order every stage uses: sorted IATA codes."""
    return sorted(manifest["iata"].unique())
