"""Income maps read from imagery alone: the 200 m cells of any area that orthophotos cover, scored by a
city's fold models, and a GeoTIFF on the INSPIRE grid.

A cell some fold trained on (its training or validation part, as the city's folds.csv says) is scored
only by the fold models that did not train on it (out-of-fold); every other cell by the mean of all
fold models. Each model scores only the cells it is needed for.

The cells are those of the INSPIRE 200 m grid (EPSG:3035) whose centre lies inside the area, the rule
extraction applies to a city's boundary, whether or not the census has them. Their images are cut as
the extraction stage cuts them (urbanlens.ses.extraction). A model is used only on images made like
those it was trained on: same orthophoto product (bands), same ground size of a cell and of a pixel.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from ..core import files, gis_style, outputs, runs
from ..core.errors import CheckpointError, ConfigError, DataError
from . import extraction, fitting
from .columns import opening
from .data import CellDataset
from .grid import LAEA, cell_boxes, inspire_id, parse_inspire_id
from .model import N_CLASSES, check_backbone, load_ses_model

# What the cell images of a prediction are made from (the scores are made anew by every run).
RUN_KEYS = ("paths.data", "ses.ua_dir", "ses.aerial_dir", "ses.cell_size_m", "ses.cell_px", "ses.ortho_product",
            "ses.ua_boundary")


STAMP = "predict_income.stamp.json"  # the run stamp (urbanlens.core.runs) in <city>/predicted


# What a model must share with the new images: the bands read and the ground size of cells and pixels.
IMAGE_KEYS = ("ses.ortho_product", "ses.cell_size_m", "ses.cell_px")


PROB_COLUMNS = [f"p_{k}" for k in range(N_CLASSES)]


def read_area(path) -> shapely.Geometry:
    """The union of the polygons of a vector file (any format GDAL reads), in EPSG:3035."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "area file not found", "pass a polygon file (GeoPackage, shapefile, GeoJSON) to --area")
    with opening(path, "area", "pass a polygon file (GeoPackage, shapefile, GeoJSON) to --area"):
        area = gpd.read_file(path)
    if area.crs is None:
        raise DataError(path, "the area has no CRS", "save it with its CRS (e.g. EPSG:3035 or EPSG:2154)")
    polygons = area[area.geometry.notna() & area.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polygons.empty:
        raise DataError(path, "no polygon in the area file", "draw the area as one or more polygons")
    return polygons.to_crs(LAEA).geometry.union_all()


def grid_cells(area: shapely.Geometry, cell_m: int = 200) -> gpd.GeoDataFrame:
    """Every cell of the INSPIRE grid whose centre lies inside ``area`` (EPSG:3035), in cell-id order."""
    xmin, ymin, xmax, ymax = area.bounds
    es = np.arange(math.floor(xmin / cell_m), math.ceil(xmax / cell_m)) * cell_m
    ns = np.arange(math.floor(ymin / cell_m), math.ceil(ymax / cell_m)) * cell_m
    e, n = (g.ravel() for g in np.meshgrid(es, ns))
    shapely.prepare(area)
    inside = shapely.contains_xy(area, e + cell_m / 2, n + cell_m / 2)
    ids = sorted(inspire_id(x, y, cell_m) for x, y in zip(e[inside], n[inside]))
    return gpd.GeoDataFrame({"cell_id": ids}, geometry=cell_boxes(ids), crs=LAEA)


def covered(cells: gpd.GeoDataFrame, tiles: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The cells that some orthophoto tile overlaps, with their ``tiles`` (tuple of paths)."""
    from .tiles import tiles_for_cells

    if cells.empty or tiles.empty:
        return cells.assign(tiles=[()] * len(cells)).iloc[:0]
    cells = cells.assign(tiles=tiles_for_cells(cells, tiles))
    return cells[cells["tiles"].str.len() > 0].reset_index(drop=True)


def fold_checkpoints(city_dir) -> list[Path]:
    """The ``best.pt`` of every fold of a trained city (its metrics.json says how many)."""
    city_dir = Path(city_dir)
    summary = city_dir / "metrics.json"
    if not summary.is_file():
        raise CheckpointError(summary, "not found: the city has no trained models",
                              f"run efficientnet_training.py with {city_dir.name} in ses.cities first")
    paths = [city_dir / f"fold_{k}" / "best.pt" for k in range(int(files.read_json(summary)["folds"]))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(missing[0], f"{len(missing)} of {len(paths)} fold models missing",
                              "re-run efficientnet_training.py (finished folds are kept)")
    return paths


def _value(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def image_mismatch(trained: dict, cfg) -> list[str]:
    """``'<key>: model <a>, images <b>'`` for each of IMAGE_KEYS where the model's config differs from ``cfg``
    (a key the model's config predates reads as its default)."""
    from ..core.config import load_config

    now, defaults = (c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in (cfg, load_config(None)))
    model = {k: _value(trained, k) if _value(trained, k) is not None else _value(defaults, k) for k in IMAGE_KEYS}
    return [f"{k}: model {model[k]!r}, images {_value(now, k)!r}" for k in IMAGE_KEYS if model[k] != _value(now, k)]


def load_fold_models(paths: Sequence, cfg, device) -> tuple[list, list[dict]]:
    """The fold models (eval mode, on ``device``) and their checkpoints; ConfigError naming the difference
    when a model was trained on images made otherwise than this config makes them."""
    models, ckpts = [], []
    for path in paths:
        model, ckpt = load_ses_model(path, map_location=device)
        check_backbone(ckpt, cfg, path)
        changed = image_mismatch(ckpt["config"], cfg)
        if changed:
            raise ConfigError(path, "trained on other images than these (" + "; ".join(changed) + ")",
                              "set those keys to the model's values (--set), or train a model on such images")
        models.append(model)
        ckpts.append(ckpt)
    return models, ckpts


FOLDS_CSV = "folds.csv"  # a city's split manifest (ses.folds.folds_frame), written by efficientnet_training.py


TRAINED_PARTS = ("train", "val")  # the parts of a fold whose cells shaped its model


NOT_TRAINED = "all folds (not trained on)"


IN_SAMPLE = "in-sample (every fold trained on it)"


VOID = "void (not scored)"


def trained_on(folds_csv, cell_ids: Sequence[str], n_folds: int) -> np.ndarray:
    """[folds, cells] True where fold k trained on the cell (its ``train`` or ``val`` part in folds.csv)."""
    fix = "re-run efficientnet_training.py for this city (finished folds are kept)"
    folds = outputs.read_csv(folds_csv, "efficientnet_training.py", ["fold", "cell_id", "part"], fix,
                             dtype={"cell_id": str, "part": str})
    if set(folds["fold"].unique()) != set(range(n_folds)):
        raise DataError(folds_csv, f"folds {sorted(folds['fold'].unique())} do not match the {n_folds} fold "
                        "models", fix)
    trained = folds[folds["part"].isin(TRAINED_PARTS)]
    index = pd.Index(list(cell_ids))
    out = np.zeros((n_folds, len(index)), dtype=bool)
    rows, cols = trained["fold"].to_numpy(int), index.get_indexer(trained["cell_id"])
    out[rows[cols >= 0], cols[cols >= 0]] = True
    return out


def scoring_plan(trained: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(needs [folds, cells]: which fold models score each cell, ``scored_by`` label of each cell) from
    ``trained`` [folds, cells]: the models that did not train on a cell where some did ('out-of-fold
    (fold k)' or '(folds j, k)'), all of them where none did (NOT_TRAINED) or all did (IN_SAMPLE)."""
    trained = np.asarray(trained, dtype=bool)
    some, every = trained.any(axis=0), trained.all(axis=0)
    needs = np.where(some & ~every, ~trained, True)
    labels = []
    for c in range(trained.shape[1]):
        folds = np.flatnonzero(needs[:, c])
        if not some[c]:
            labels.append(NOT_TRAINED)
        elif every[c]:
            labels.append(IN_SAMPLE)
        else:
            labels.append(f"out-of-fold (fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))})")
    return needs, labels


def is_out_of_fold(scored_by) -> np.ndarray:
    """True where a ``scored_by`` label says out-of-fold."""
    return pd.Series(scored_by, dtype=object).fillna("").str.startswith("out-of-fold").to_numpy()


def score(models: Sequence, image_paths: Sequence, size: int, place, batch_size: int,
          needs: np.ndarray | None = None) -> np.ndarray:
    """P(k) [folds, cells, 5] of each fold model on the cell images (resized to ``size``, min-max scaled)
    it is needed for (``needs`` [folds, cells], default all); NaN where a model is not needed."""
    from tqdm import tqdm

    paths = list(image_paths)
    needs = np.ones((len(models), len(paths)), dtype=bool) if needs is None else np.asarray(needs, dtype=bool)
    probs = np.full((len(models), len(paths), N_CLASSES), np.nan)
    with tqdm(total=int(needs.sum()), desc=f"scoring {len(paths)} cells", unit="cell") as bar:
        for k, model in enumerate(models):
            idx = np.flatnonzero(needs[k])
            if len(idx):
                data = CellDataset([paths[i] for i in idx], np.zeros(len(idx), np.int64), size)
                probs[k, idx] = np.exp(fitting.predict(model, data, place, batch_size=batch_size))
                bar.update(len(idx))
    return probs


def summarise(probs: np.ndarray) -> pd.DataFrame:
    """Per cell, over the fold models that scored it (non-NaN in ``probs`` [folds, cells, 5]):
    ``expected_class`` of their mean P(k), ``p_0..p_4`` (their means) and ``fold_spread`` (standard
    deviation of their expected classes; 0 with one model)."""
    probs = np.asarray(probs, dtype=float)
    scored = np.isfinite(probs).all(axis=2)  # [folds, cells]
    if probs.shape[1] and not scored.any(axis=0).all():
        raise ValueError("a cell no fold model scored")
    mean = np.nansum(probs, axis=0) / np.maximum(scored.sum(axis=0), 1)[:, None]
    per_fold = np.where(scored, np.nan_to_num(probs) @ np.arange(N_CLASSES), np.nan)
    out = pd.DataFrame(mean, columns=PROB_COLUMNS)
    out.insert(0, "expected_class", mean @ np.arange(N_CLASSES))
    out["fold_spread"] = np.nanstd(per_fold, axis=0) if probs.shape[1] else np.zeros(0)
    return out


def observed_class(income, edges: Sequence[float]) -> np.ndarray:
    """The training quintile an income falls in (``edges``: the highest income of classes 0..3, as the
    checkpoint records them); NaN where the income is unknown."""
    income = np.asarray(income, dtype=float)
    cls = np.searchsorted(np.asarray(edges, dtype=float), income, side="left").astype(float)
    cls[~np.isfinite(income)] = np.nan
    return cls


def grid_transform(cell_ids: Sequence[str]):
    """(transform, width, height) of the north-up raster with one pixel per 200 m cell spanning the cells:
    pixel centres are cell centres, pixel edges the cells' edges."""
    from rasterio.transform import from_origin

    e, n, res = (np.array(v) for v in zip(*[parse_inspire_id(c) for c in cell_ids]))
    if len(set(res)) != 1:
        raise ValueError(f"cells of several sizes: {sorted(set(res))}")
    r = int(res[0])
    return from_origin(e.min(), n.max() + r, r, r), int((e.max() - e.min()) // r + 1), int((n.max() - n.min()) // r + 1)


def _grid(cell_ids: Sequence[str], bands: dict[str, np.ndarray], fill, dtype):
    """([bands, H, W] of ``dtype`` with one pixel per cell, ``fill`` elsewhere; transform)."""
    transform, width, height = grid_transform(cell_ids)
    e, n, res = (np.array(v) for v in zip(*[parse_inspire_id(c) for c in cell_ids]))
    cols, rows = ((e - round(transform.c)) // res).astype(int), ((round(transform.f) - res - n) // res).astype(int)
    grid = np.full((len(bands), height, width), fill, dtype)
    for b, values in enumerate(bands.values()):
        grid[b, rows, cols] = np.asarray(values).astype(dtype)
    return grid, transform


def class_names(edges: Sequence[float] | None = None) -> list[str]:
    """The names of the income classes 0..4 (training quintiles, 0 the poorest), with their income limits
    when ``edges`` (the highest income of classes 0..3, as the checkpoint records them) are known."""
    if not edges:
        return [f"class {k} ({k + 1}/{N_CLASSES} income fifth{', poorest' if k == 0 else ', richest' if k == N_CLASSES - 1 else ''})"
                for k in range(N_CLASSES)]
    e = [float(x) for x in edges]
    return ([f"class 0 (income <= {e[0]:.0f})"]
            + [f"class {k} ({e[k - 1]:.0f} < income <= {e[k]:.0f})" for k in range(1, len(e))]
            + [f"class {len(e)} (income > {e[-1]:.0f})"])


def write_grid_tif(path, cell_ids: Sequence[str], bands: dict[str, np.ndarray], labels: Sequence[str] = ()) -> None:
    """A float32 Cloud-Optimized GeoTIFF (EPSG:3035), one pixel per cell of ``cell_ids``, one band per
    entry of ``bands`` (described by its name); pixels of no cell or of NaN values are nodata (NaN).
    Atomic. Its QGIS style colours band 1 from class 0 to 4 (the expected class), the stops labelled
    by ``labels`` (the class names) when given."""
    grid, transform = _grid(cell_ids, bands, np.nan, np.float32)
    qml = gis_style.qml_pseudocolor(0, N_CLASSES - 1, labels=labels or [str(k) for k in range(N_CLASSES)])
    gis_style.write_cog(path, grid, LAEA, transform, nodata=float("nan"), names=list(bands), qml=qml)


CLASS_NODATA = 255  # income_class.tif's pixels of no cell or of no class


def write_class_tif(path, cell_ids: Sequence[str], classes, names: Sequence[str]) -> None:
    """A uint8 class raster (EPSG:3035), one pixel per cell holding ``classes`` (NaN: nodata, CLASS_NODATA),
    with a colour table, the class names ``names`` (value k is names[k]) and a paletted QGIS style. Atomic."""
    c = np.asarray(classes, dtype=float)
    c = np.where(np.isfinite(c), np.round(c), CLASS_NODATA)
    grid, transform = _grid(cell_ids, {"income_class": c}, CLASS_NODATA, np.uint8)
    gis_style.write_cog(path, grid, LAEA, transform, nodata=CLASS_NODATA, names=["income_class"], classes=names)


def run_inputs(cfg, area_file=None) -> dict:
    """Fingerprint of what the cell images are read from: the orthophotos, the Urban Atlas (the default
    area) and the ``--area`` file."""
    root = Path(cfg.paths.data)
    names = [cfg.ses.aerial_dir, cfg.ses.ua_dir] + ([Path(area_file).resolve()] if area_file else [])
    return runs.fingerprint(root, runs.files_under(root, *names))


def image_paths(cell_ids: Sequence[str], cfg, ses_dir, city: str) -> list[str]:
    """Where each cell's image goes, relative to ``<results>/ses``: the extraction stage's image when that
    stage ran with this config on these data (its run stamp says so) and the image is there, else
    ``<city>/predicted/imagery/``."""
    ses_dir = Path(ses_dir)
    same = not runs.compare(ses_dir / extraction.STAMP, cfg, extraction.RUN_KEYS, extraction.run_inputs(cfg))
    imagery = "imagery" if cfg.ses.ortho_product == "RVB" else f"imagery-{cfg.ses.ortho_product}"
    own = [f"{imagery}/{city}/{extraction.cell_filename(c)}" for c in cell_ids]
    return [o if same and (ses_dir / o).is_file() else f"{city}/predicted/imagery/{extraction.cell_filename(c)}"
            for c, o in zip(cell_ids, own)]


def census_income(cells: gpd.GeoDataFrame, census_path) -> np.ndarray:
    """The census income of each cell (NaN where the census has none, or no census file is there)."""
    from .census import find_census, read_census

    census_path, _ = find_census(census_path)  # the 2015 shapefile too, when it is its folder's one grid
    if not census_path.exists() or cells.empty:
        return np.full(len(cells), np.nan)
    census = read_census(census_path, bbox=cells.total_bounds)
    return cells["cell_id"].map(census.set_index("cell_id")["income"]).to_numpy(float)


def clear(out) -> None:
    """Remove a prediction's own cell images and tables (``out``: ``<city>/predicted``), so that none of
    another run is reused."""
    import shutil

    out = Path(out)
    if (out / "imagery").is_dir():
        shutil.rmtree(out / "imagery")
    for table in [*out.glob("cells*.gpkg"), out / "agreement.json"]:
        table.unlink(missing_ok=True)
