"""Reading back what another stage wrote: one reader per format (JSON, CSV, GeoPackage layer, GeoTIFF).

A file that is missing, empty, truncated, not of its format (a ``.json`` that is binary, a ``.gpkg``
that is text) or without the columns or keys the reader needs is one ``DamagedOutput`` line naming the
file and the stage that writes it again, e.g.
``results/demo/cities/metrics.json: empty or damaged (written by test_classification.py); re-run
test_classification.py, which writes it again``; what the operating system refuses (permission) is a
``FileSystemError`` naming the file. Checkpoints are read by ``urbanlens.core.runtime.load_checkpoint``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DamagedOutput, DataError
from .files import os_problem


def rerun(writer: str) -> str:
    """The fix for a damaged output of ``writer`` (a script name): every reader here reads a file its
    writer writes again on each run, so a plain re-run replaces it (finished work elsewhere is kept)."""
    return f"re-run {writer}, which writes it again"


def damaged(path, writer: str, problem: str = "empty or damaged", fix: str | None = None) -> DamagedOutput:
    """``<path>: <problem> (written by <writer>); <fix>``."""
    return DamagedOutput(path, f"{problem} (written by {writer})", fix or rerun(writer))


def missing(path, writer: str) -> DataError:
    return DataError(path, "not found", f"run {writer} first")


@contextlib.contextmanager
def reading(path, writer: str, errors: tuple[type[BaseException], ...], fix: str | None = None,
            what: str | None = None) -> Iterator[None]:
    """Inside: ``errors`` (the format library's "not this format" errors) become ``damaged`` ("not a
    readable <what>" when ``what`` is given), a refused OSError a ``FileSystemError``, a missing file
    ``missing``."""
    try:
        yield
    except FileNotFoundError:
        raise missing(path, writer) from None
    except errors as e:
        refused = os_problem(e, path)
        if refused is not None:
            raise refused from None
        detail = _detail(e, path)
        problem = f"not a readable {what}" if what else "empty or damaged"
        raise damaged(path, writer, f"{problem} ({detail})", fix) from None
    except OSError as e:
        raise (os_problem(e, path) or damaged(path, writer, f"unreadable ({e.strerror or e})", fix)) from None


def _detail(error: BaseException, path) -> str:
    """The library's reason, short and on one line, without the path (said already) or a ``;``."""
    text = str(error).replace(f"'{path}'", "").replace(str(path), "").split(";")[0].splitlines()
    text = text[0].strip(" .:") if text else ""
    return text[:100] or type(error).__name__


def _check_columns(path, writer: str, have: Iterable[str], need: Iterable[str], fix: str | None) -> None:
    lacking = [c for c in need if c not in set(have)]
    if lacking:
        raise damaged(path, writer, f"columns {lacking} missing", fix)


def read_json(path, writer: str, keys: Iterable[str] = (), fix: str | None = None) -> Any:
    """The JSON object at ``path``, holding every one of ``keys`` (then a dict is required)."""
    path = Path(path)
    with reading(path, writer, (ValueError, UnicodeDecodeError), fix):
        obj = json.loads(path.read_bytes().decode("utf-8"))
    keys = list(keys)
    if keys and not isinstance(obj, dict):
        raise damaged(path, writer, f"not a JSON object (a {type(obj).__name__})", fix)
    lacking = [k for k in keys if k not in obj]
    if lacking:
        raise damaged(path, writer, f"keys {lacking} missing", fix)
    return obj


def read_csv(path, writer: str, columns: Iterable[str] = (), fix: str | None = None, **kwargs):
    """The pandas frame of the CSV at ``path`` (``kwargs`` go to ``pd.read_csv``), with ``columns``."""
    import pandas as pd

    path = Path(path)
    with reading(path, writer, (ValueError, UnicodeDecodeError, pd.errors.ParserError), fix):
        frame = pd.read_csv(path, **kwargs)
    _check_columns(path, writer, frame.columns, columns, fix)
    return frame


def read_gpkg(path, layer: str, writer: str, need: Iterable[str] = (), fix: str | None = None,
              what: str | None = None, **kwargs):
    """Layer ``layer`` of the GeoPackage at ``path`` (``kwargs`` go to ``geopandas.read_file``: columns,
    ignore_geometry, ...), holding the columns ``need``."""
    import geopandas as gpd
    import pyogrio

    path = Path(path)
    if not path.is_file():  # GDAL reads a folder as a data source; a missing one is not damaged
        raise missing(path, writer) if not path.exists() else damaged(path, writer, "a folder, not a GeoPackage", fix)
    gdal = (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FieldError)
    with reading(path, writer, gdal, fix, what or f"GeoPackage (layer '{layer}')"):
        frame = gpd.read_file(path, layer=layer, engine="pyogrio", **kwargs)
    _check_columns(path, writer, frame.columns, need, fix)
    return frame


def read_geotiff(path, writer: str, fix: str | None = None):
    """``(pixels [bands, H, W] masked array, transform, crs)`` of the raster at ``path``."""
    import rasterio

    path = Path(path)
    with reading(path, writer, (rasterio.errors.RasterioError,), fix):
        with rasterio.open(path) as src:
            return src.read(masked=True), src.transform, src.crs
