"""Files and the operating system, and damaged intermediate outputs: what the system refuses (permission,
read-only, disk full, a folder where a file goes) and every file one stage reads back from another
(empty, garbage, of another kind, without its columns) is one line naming the file and, for outputs,
the stage that writes it again; nothing half-written is left."""
import errno
import json
import os
import pathlib
import signal
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch

from urbanlens.cities import patches
from urbanlens.cities import training as cities_training
from urbanlens.core import entry, files, outputs, runtime, shards
from urbanlens.core.errors import CheckpointError, DamagedOutput, DataError, FileSystemError
from urbanlens.ses import data as ses_data
from urbanlens.ses import extraction, findings, maps, results, skips

ROOT_USER = os.geteuid() == 0  # chmod does not restrict root: there the refusal is simulated


def _one_line(err, *words):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, (w, msg)
    return msg


def _temps(folder):
    return [p for p in Path(folder).rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------- the OS refuses

def test_disk_full_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"accuracy": 0.5})
    real = pathlib.Path.write_text

    def fill_disk(self, text, *a, **k):
        real(self, text[:5])  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", fill_disk)
    with pytest.raises(FileSystemError) as err:
        files.write_json(target, {"accuracy": 0.9})
    _one_line(err, target, "no space left", "paths.results")
    assert json.loads(target.read_text()) == {"accuracy": 0.5} and not _temps(tmp_path)


def test_read_only_and_unwritable_folders(tmp_path, monkeypatch):
    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", read_only)
        with pytest.raises(FileSystemError) as err:
            files.write_text(tmp_path / "a.txt", "x")
    _one_line(err, tmp_path / "a.txt", "read-only")
    assert not _temps(tmp_path) and not (tmp_path / "a.txt").exists()

    locked = tmp_path / "locked"
    locked.mkdir()
    if ROOT_USER:
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(FileSystemError) as err:
            files.write_csv(pd.DataFrame({"a": [1]}), locked / "t.csv")
    finally:
        locked.chmod(0o700)
    _one_line(err, locked, "cannot be written", "chmod")
    assert list(locked.iterdir()) == []


def test_a_folder_where_a_file_goes_and_a_file_where_a_folder_goes(tmp_path):
    (tmp_path / "predictions.csv").mkdir()
    with pytest.raises(FileSystemError) as err:
        files.write_csv(pd.DataFrame({"a": [1]}), tmp_path / "predictions.csv")
    _one_line(err, tmp_path / "predictions.csv", "is a folder where a file is expected", "remove or rename")
    (tmp_path / "checkpoints").write_text("a file")
    with pytest.raises(FileSystemError) as err:
        files.write_text(tmp_path / "checkpoints" / "best.pt", "x")
    _one_line(err, tmp_path / "checkpoints", "where a folder is expected")
    assert not _temps(tmp_path)


def test_an_input_folder_the_user_cannot_read_is_one_line(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    (raw / "Paris (PAR)").mkdir(parents=True)
    if ROOT_USER:
        def refuse(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(pathlib.Path, "iterdir", refuse)
    else:
        raw.chmod(0o000)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as end:
            entry.run(lambda: list(raw.iterdir()))
    finally:
        signal.signal(signal.SIGTERM, handler)
        raw.chmod(0o700)
    lines = capsys.readouterr().err.strip().splitlines()
    assert end.value.code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {raw}: permission denied;") and "chmod" in lines[0]


# ---------------------------------------------------------------------------- damaged intermediates

BROKEN = {"empty": b"", "garbage": os.urandom(64) + b"\x00\xff", "text": b"half a download\n"}


@pytest.mark.parametrize("kind", ["empty", "garbage", "columns", "no rows"])
def test_damaged_manifest(tmp_path, kind):
    path = patches.patches_dir(tmp_path) / "manifest.csv"
    path.parent.mkdir(parents=True)
    content = {"columns": b"path,city\na.jpg,Paris\n", "no rows": (",".join(patches.MANIFEST_COLUMNS) + "\n").encode()}
    path.write_bytes(content.get(kind, BROKEN.get(kind, b"")))
    with pytest.raises(DamagedOutput) as err:
        patches.read_manifest(tmp_path)
    _one_line(err, path, "written by preprocessing.py", "re-run preprocessing.py, which writes it again")


@pytest.mark.parametrize("kind", ["empty", "garbage", "text"])
def test_damaged_json_outputs(tmp_path, kind):
    """Fold metrics, a city's skip note, a city's metrics.json (read by the map stage)."""
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "metrics.json").write_bytes(BROKEN[kind])
    with pytest.raises(DamagedOutput) as err:
        results.city_summary(tmp_path, 1)
    _one_line(err, tmp_path / "fold_0" / "metrics.json", "efficientnet_training.py", "delete that fold's folder")
    (tmp_path / skips.SKIPPED).write_bytes(BROKEN[kind])
    with pytest.raises(DamagedOutput) as err:
        skips.skip_reason(tmp_path)
    _one_line(err, skips.SKIPPED, "efficientnet_training.py")


def test_json_without_the_keys_read_and_a_missing_one(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("[1, 2]")
    with pytest.raises(DamagedOutput) as err:
        outputs.read_json(path, "efficientnet_training.py", ["best_fold"])
    _one_line(err, path, "not a JSON object")
    path.write_text('{"mean": {}}')
    with pytest.raises(DamagedOutput) as err:
        outputs.read_json(path, "efficientnet_training.py", ["best_fold"])
    _one_line(err, "keys ['best_fold'] missing", "efficientnet_training.py")
    with pytest.raises(DataError) as err:
        outputs.read_json(tmp_path / "nowhere.json", "test_classification.py")
    _one_line(err, "not found", "run test_classification.py first")


@pytest.mark.parametrize("kind", ["empty", "garbage", "text"])
def test_damaged_csv_outputs(tmp_path, kind):
    log = tmp_path / "train_log.csv"
    log.write_bytes(BROKEN[kind])
    with pytest.raises(DamagedOutput) as err:
        cities_training.read_log(log, 3)
    _one_line(err, log, "train_classification.py")
    (tmp_path / "predictions.csv").write_bytes(BROKEN[kind])
    if kind == "text":  # one column named by the text: parses, no column is asked for here
        return
    with pytest.raises(DamagedOutput) as err:
        findings.read_predictions(tmp_path)
    _one_line(err, tmp_path / "predictions.csv", "efficientnet_training.py")


@pytest.mark.parametrize("kind", ["empty", "garbage", "text", "folder"])
def test_damaged_geopackages(tmp_path, kind):
    cells = tmp_path / "cells.gpkg"
    if kind == "folder":
        cells.mkdir()
    else:
        cells.write_bytes(BROKEN[kind])
    with pytest.raises(DamagedOutput) as err:
        ses_data.read_cells(cells)
    _one_line(err, cells, "generate_fr_ua_aerial_data.py")
    if kind != "folder":
        part = tmp_path / "polygon_stats.shard-1-of-2.gpkg"
        part.write_bytes(BROKEN[kind])
        with pytest.raises(DamagedOutput) as err:
            shards.append_layers([part], tmp_path / "merged.gpkg", "polygon_stats", None)
        _one_line(err, part, "--shard", "re-run that shard")


def test_cell_index_without_its_columns(tmp_path):
    path = tmp_path / "cells.gpkg"
    gpd.GeoDataFrame({"cell_id": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:3035").to_file(path, layer="cells")
    with pytest.raises(DamagedOutput) as err:
        ses_data.read_cells(path)
    _one_line(err, path, "'income'", "missing", "generate_fr_ua_aerial_data.py")
    # the extraction's re-run reads only the columns it needs of its own index
    part = outputs.read_gpkg(path, "cells", "generate_fr_ua_aerial_data.py", ["cell_id"], columns=["cell_id"],
                             ignore_geometry=True)
    assert part["cell_id"].tolist() == ["a"]


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "wrong dict", "folder"])
def test_damaged_checkpoints(tmp_path, kind):
    path = tmp_path / "best.pt"
    if kind == "folder":
        path.mkdir()
    elif kind in BROKEN:
        path.write_bytes(BROKEN[kind])
    else:
        torch.save({"weights": {"w": torch.zeros(64)}} if kind == "wrong dict" else {"model": {"w": torch.zeros(4096)}}, path)
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(CheckpointError) as err:
        runtime.load_checkpoint(path, writer="train_classification.py")
    _one_line(err, path, "the training stage (train_classification.py)")


@pytest.mark.parametrize("kind", ["empty", "garbage", "one band"])
def test_damaged_map_geotiff(tmp_path, kind):
    path = tmp_path / "cams" / "cell.tif"
    path.parent.mkdir()
    if kind == "one band":
        maps.write_maps_tif(path, np.ones((1, 4, 4), np.float32), (0, 0, 200, 200), "EPSG:3035")
    else:
        path.write_bytes(BROKEN[kind])
    with pytest.raises(DamagedOutput) as err:
        maps.read_maps_tif(path)
    _one_line(err, path, "gradcaming_urban_areas.py", "delete it")


# ----------------------------------------------------------------------------------- empty stages

def test_an_extraction_without_a_usable_cell_is_a_stop(tmp_path):
    index = tmp_path / "cells.gpkg"
    cells = pd.DataFrame({"city": ["Paris", "Paris", "Lyon"], "non_void": [False, False, False]})
    with pytest.raises(DataError) as err:
        extraction.check_usable(cells, 0.01, index)
    _one_line(err, index, "all 3 cells of Lyon, Paris are void", "ses.max_nodata")
    with pytest.raises(DataError) as err:
        extraction.check_usable(cells.iloc[:0], 0.01, index)
    _one_line(err, "no census cell lies inside the Urban Atlas boundary", "ses.cities")
    extraction.check_usable(cells.assign(non_void=[False, True, False]), 0.01, index)  # one usable cell is enough


def test_a_writer_without_errno_on_a_full_disk(tmp_path, monkeypatch):
    """GDAL and rasterio say "write failed" without an errno: the free space tells."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")

    def gdal_write(tmp):
        tmp.write_bytes(b"part")
        raise RuntimeError("TIFFAppendToStrip:Write error")

    with pytest.raises(RuntimeError):  # room left: the writer's own error
        with files.atomic_path(tmp_path / "cell.tif") as tmp:
            gdal_write(tmp)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 4096))
    with pytest.raises(FileSystemError) as err:
        with files.atomic_path(tmp_path / "cell.tif") as tmp:
            gdal_write(tmp)
    _one_line(err, tmp_path / "cell.tif", "no space left")
    assert not _temps(tmp_path) and not (tmp_path / "cell.tif").exists()
