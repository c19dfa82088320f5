"""Cutting the planned patches out of the converted source images, leaving blank ones out.

Each source image is read once (``rasters.convert``: 8-bit RGB, nodata mask, what was done to it),
in parallel over images. A patch with more than ``max_nodata`` of its pixels nodata, or of one constant
colour, is left out (its reason kept); the others are written when missing (temporary name, then
renamed; files already there are left untouched). Every image is read on each run, also when all its
patches exist, so the record of its scaling and the blank test stay current.

The per-image record (``SOURCE_COLUMNS``, written as ``<patches>/sources.csv``): source, city, iata,
dtype, bands (count in the file), bands_used (1-based, as R,G,B), scale (none | percentile | fixed),
limits (per band used, ``lo..hi`` mapped to 0..255), res_m (metres per pixel of the file, empty when not
georeferenced), ground_m (metres per pixel it was resampled to, empty when not), width, height (file),
out_width, out_height (as cut), nodata_share, saturated_share (valid pixels at 255 in some band),
patches, left_out.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..core.files import atomic_path
from . import rasters

SOURCE_COLUMNS = ["source", "city", "iata", "dtype", "bands", "bands_used", "scale", "limits", "res_m", "ground_m",
                  "width", "height", "out_width", "out_height", "nodata_share", "saturated_share", "patches",
                  "left_out"]


@dataclass
class CutResult:
    written: int = 0                                   # patch files written now
    left_out: dict = field(default_factory=dict)       # {patch path: "nodata" | "constant"}
    sources: list = field(default_factory=list)        # one SOURCE_COLUMNS record per image read
    failed: dict = field(default_factory=dict)         # {source: problem line}

    def kept(self, plan: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``plan`` that were cut (test_b rows whose test patch was left out go too)."""
        gone = set(self.left_out) | {"test_b/" + p.split("/", 1)[1] for p in self.left_out if p.startswith("test/")}
        return plan[~plan["source"].isin(self.failed) & ~plan["path"].isin(gone)]


def blank_reason(valid: np.ndarray, rgb: np.ndarray, max_nodata: float, drop_constant: bool = True) -> str | None:
    """"nodata" when more than ``max_nodata`` of the patch is nodata, "constant" when every valid pixel
    has the same colour, else None."""
    n_valid = np.count_nonzero(valid)
    if 1 - n_valid / valid.size > max_nodata:
        return "nodata"
    if not drop_constant:
        return None
    if n_valid == 0:
        return "constant"
    if n_valid == valid.size:  # no hole: compare in place, without gathering the valid pixels
        return "constant" if (rgb == rgb[0, 0]).all() else None
    px = rgb[valid]
    return "constant" if (px == px[0]).all() else None


def _cut_source(job: tuple) -> tuple[int, dict, dict | None, str | None]:
    """One source image: (files written, {path: reason left out}, its record, problem or None)."""
    src, out_dir, rows, quality, opts, max_nodata, drop_constant = job
    out_dir = Path(out_dir)
    try:
        rgb, valid, info = rasters.convert(src, opts)
    except Exception as e:  # rasterio and Pillow raise several kinds for broken files
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        if type(e).__name__ == "DataError":
            return 0, {}, None, str(e)
        return 0, {}, None, f"{src}: unreadable image ({reason}); replace or delete it"
    written, left = 0, {}
    for path, split, y, x, size in rows:
        if split == "test_b":
            continue
        why = blank_reason(valid[y:y + size, x:x + size], rgb[y:y + size, x:x + size], max_nodata, drop_constant)
        if why:
            left[path] = why
            continue
        if not (out_dir / path).exists():
            with atomic_path(out_dir / path) as tmp:
                Image.fromarray(np.ascontiguousarray(rgb[y:y + size, x:x + size])).save(tmp, quality=quality)
            written += 1
    return written, left, info, None


def cut(plan: pd.DataFrame, raw_dir: str | Path, out_dir: str | Path, opts: dict, max_nodata: float = 0.01,
        quality: int = 95, workers: int = 1, progress: bool = True, drop_constant: bool = True) -> CutResult:
    """Cut every train/val/test patch of ``plan`` (test_b rows are only checked: ``link_test_b`` makes
    them); ``opts`` from ``rasters.options``."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    groups = list(plan.groupby("source", sort=True))
    jobs = [(str(raw_dir / src), str(out_dir), list(g[["path", "split", "y", "x", "size"]].itertuples(index=False,
             name=None)), quality, opts, max_nodata, drop_constant) for src, g in groups]
    res = CutResult()
    bar = tqdm(total=len(jobs), desc="patches", unit="img", disable=not progress)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(mp.get_context().Pool(min(workers, len(jobs))))
            results = pool.imap(_cut_source, jobs)  # in job order, so each result meets its source
        else:
            results = map(_cut_source, jobs)
        for (source, g), (n, left, info, problem) in zip(groups, results):
            bar.update()
            if problem:
                res.failed[source] = problem
                continue
            res.written += n
            res.left_out.update(left)
            cut_rows = int((g["split"] != "test_b").sum())
            res.sources.append({"source": source, "city": g["city"].iloc[0], "iata": g["iata"].iloc[0], **info,
                                "patches": cut_rows - len(left), "left_out": len(left)})
    bar.close()
    return res


def sources_frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=SOURCE_COLUMNS)


def link_test_b(plan: pd.DataFrame, out_dir: str | Path) -> int:
    """Make each missing test_b file of ``plan`` a hard link to (or copy of) its test patch; returns how many."""
    out_dir, n = Path(out_dir), 0
    for path in plan.loc[plan["split"] == "test_b", "path"]:
        target = out_dir / path
        if target.exists():
            continue
        original = out_dir / ("test/" + path.split("/", 1)[1])
        with atomic_path(target) as tmp:
            try:
                os.link(original, tmp)
            except OSError:
                shutil.copyfile(original, tmp)
        n += 1
    return n


def left_out_counts(result: CutResult, plan: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{iata: {reason: patches left out}}``."""
    city = dict(zip(plan["path"], plan["iata"]))
    out: dict[str, dict[str, int]] = {}
    for path, why in sorted(result.left_out.items()):
        counts = out.setdefault(city[path], {})
        counts[why] = counts.get(why, 0) + 1
    return out
