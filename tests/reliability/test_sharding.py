"""Sharded data stages: n independent jobs plus a merge give exactly the files of one unsharded run; the
SES trainer under torchrun (2 CPU processes, gloo, ses.train.freeze=backbone) gives a model that loads,
evaluates and maps."""
import argparse
import filecmp
import json
import shutil
import sqlite3
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch

from urbanlens.core import errors, shards
from script_runner import ROOT, TORCHRUN, run_script, script_command, start

CITIES = ("Paris", "Lyon")
CONFIG = "tests/conf/ses_shards.yaml"  # the smallest world whose cities still hold two cells per income quintile
EXTRACT_SHARDS, CAM_SHARDS = 3, 2
FROZEN = ["ses.train.freeze=backbone"]  # the torchrun model: its sigmoid unit alone, on embeddings gathered over the ranks


# ------------------------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("total", [0, 1, 2, 5, 7, 16, 33, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 40])
def test_chunks_cover_every_item_once_and_are_balanced(total, n):
    bounds = shards.chunk_bounds(total, n)
    assert len(bounds) == n
    covered = np.concatenate([np.arange(a, b) for a, b in bounds])
    np.testing.assert_array_equal(covered, np.arange(total))  # in order: no overlap, no gap
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("total,align", [(0, 4), (1, 4), (9, 4), (16, 4), (33, 8), (50, 1), (7, 10)])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_aligned_ranges_cut_only_at_batch_edges(total, align, n):
    ranges = [shards.shard_range(total, i, n, align) for i in range(1, n + 1)]
    covered = np.concatenate([np.arange(a, b) for a, b in ranges])
    np.testing.assert_array_equal(covered, np.arange(total))
    for a, b in ranges:  # cuts fall on batch edges, so no batch of an unsharded run straddles two shards
        assert a % align == 0 or a == total
        assert b % align == 0 or b == total
    blocks = [-(-(b - a) // align) for a, b in ranges]
    assert max(blocks) - min(blocks) <= 1 and sum(blocks) == -(-total // align)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_shard_positions_split_each_city_in_cell_id_order(n):
    rng = np.random.default_rng(1)
    ids = np.array([f"CRS3035RES200mN{y}E{x}" for y, x in rng.integers(2_000_000, 3_000_000, size=(23, 2)) * 200])
    cities = np.array(["Paris"] * 13 + ["Lyon"] * 10)
    perm = rng.permutation(len(ids))
    ids, cities = ids[perm], cities[perm]
    picks = [shards.shard_positions(ids, cities, i, n) for i in range(1, n + 1)]
    allpos = np.concatenate(picks)
    assert sorted(allpos) == list(range(len(ids)))  # every row once
    for p in picks:
        assert list(p) == sorted(p)  # rows keep their unsharded order
    for city in ("Paris", "Lyon"):  # per city: shard 1 has the smallest ids, contiguous in sorted order
        chunks = [sorted(ids[p][cities[p] == city]) for p in picks]
        assert sum(chunks, []) == sorted(ids[cities == city])
        sizes = [len(c) for c in chunks]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text,expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 4/4 ", (4, 4)), ("10/12", (10, 12))])
def test_parse_shard_accepts_i_of_n(text, expected):
    assert shards.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["3/2", "0/0", "0/4", "x", "1/0", "-1/2", "1.5/2", "1/2/3", "", "2"])
def test_parse_shard_rejects_bad_values(text):
    with pytest.raises(ValueError, match="--shard"):
        shards.parse_shard(text)


def test_shard_paths_name_the_missing_shards(tmp_path):
    target = tmp_path / "cells.gpkg"
    assert shards.shard_path(target, 2, 4) == tmp_path / "cells.shard-2-of-4.gpkg"
    for i in (1, 3):
        shards.shard_path(target, i, 4).write_text("x")
    with pytest.raises(errors.DataError, match=r"2 of 4 shard outputs missing \(shard 2, 4,.*--shard 2/4"):
        shards.shard_paths(target, 4)
    for i in (2, 4):
        shards.shard_path(target, i, 4).write_text("x")
    assert [p.name for p in shards.shard_paths(target, 4)] == [f"cells.shard-{i}-of-4.gpkg" for i in range(1, 5)]
    with pytest.raises(errors.DataError, match="older than the model"):
        shards.shard_paths(target, 4, newer_than=shards.shard_path(target, 4, 4).stat().st_mtime + 10)


def test_merge_in_order_restores_order_and_rejects_overlap_and_gap():
    order = ["c", "a", "d", "b"]
    parts = [pd.DataFrame({"cell_id": ["a", "b"], "v": [1, 2]}), pd.DataFrame({"cell_id": ["c", "d"], "v": [3, 4]})]
    merged = shards.merge_in_order(parts, order)
    assert merged["cell_id"].tolist() == order and merged["v"].tolist() == [3, 1, 4, 2]
    with pytest.raises(errors.DataError, match="share a cell_id"):
        shards.merge_in_order([parts[0], parts[0], parts[1]], order)
    with pytest.raises(errors.DataError, match="in no shard output"):
        shards.merge_in_order(parts[:1], order)
    with pytest.raises(errors.DataError, match="not among the cells"):
        shards.merge_in_order(parts, order[:3])


# ---------------------------------------------------------------------------- stages as a user runs them

ENV = {"OMP_NUM_THREADS": "1"}


def run(args, root, results="A", extra=(), check=True, launcher=(sys.executable,)):
    return run_script(args, root / "data", root / results, extra, CONFIG, launcher, env=ENV, check=check, timeout=600)


def run_together(jobs, root):
    """Start several stage runs at once (like the jobs of an array) and wait for all of them."""
    procs = [(args, start(script_command(args, root / "data", root / results, (), CONFIG), env=ENV, quiet=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for args, results in jobs]
    for args, p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{' '.join(args)} failed:\n{out[-3000:]}\n{err[-3000:]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Results A: unsharded extraction, one model trained under torchrun, unsharded maps. Results B: the
    same stages in shards plus merges, with A's model."""
    root = tmp_path_factory.mktemp("shard_world")
    run(["-m", "urbanlens.ses.world"], root)
    run_together([(["generate_fr_ua_aerial_data.py"], "A")]
                 + [(["generate_fr_ua_aerial_data.py", "--shard", f"{i}/{EXTRACT_SHARDS}"], "B")
                    for i in range(1, EXTRACT_SHARDS + 1)], root)
    merged = run(["generate_fr_ua_aerial_data.py", "--merge", str(EXTRACT_SHARDS)], root, "B")
    launcher = (*TORCHRUN, "--nproc_per_node", "2")
    ddp = run(["efficientnet_training.py"], root, "A", FROZEN, launcher=launcher, check=False)
    if ddp.returncode != 0:  # torchrun could not start here: one process, so the sharding tests still run
        run(["efficientnet_training.py"], root, "A", FROZEN)
    for city in CITIES:  # B maps with A's model
        shutil.copytree(root / "A" / "ses" / city, root / "B" / "ses" / city)
    run_together([(["gradcaming_urban_areas.py"], "A")]
                 + [(["gradcaming_urban_areas.py", "--shard", f"{i}/{CAM_SHARDS}"], "B")
                    for i in range(1, CAM_SHARDS + 1)], root)
    run(["gradcaming_urban_areas.py", "--merge", str(CAM_SHARDS)], root, "B")
    return root, ddp, merged.stdout


def assert_same_table(a, b, layer):
    ta, tb = gpd.read_file(a, layer=layer), gpd.read_file(b, layer=layer)
    assert len(ta) > 0 and list(ta.columns) == list(tb.columns)
    pd.testing.assert_frame_equal(pd.DataFrame(ta.drop(columns="geometry")),
                                  pd.DataFrame(tb.drop(columns="geometry")), check_exact=True)
    assert ta.crs == tb.crs and ta.crs.to_epsg() == 3035
    assert list(ta.geometry.to_wkb()) == list(tb.geometry.to_wkb())


def assert_same_files(a_dir, b_dir, pattern):
    a_files = sorted(p.relative_to(a_dir) for p in a_dir.glob(pattern))
    assert a_files and a_files == sorted(p.relative_to(b_dir) for p in b_dir.glob(pattern))
    different = [str(f) for f in a_files if not filecmp.cmp(a_dir / f, b_dir / f, shallow=False)]
    assert not different, different


def test_sharded_extraction_equals_unsharded(world):
    root, _, log = world
    a, b = root / "A" / "ses", root / "B" / "ses"
    assert f"merged from {EXTRACT_SHARDS} shards" in log
    assert_same_table(a / "cells.gpkg", b / "cells.gpkg", "cells")
    assert_same_files(a, b, "imagery/*/*.png")
    parts = [gpd.read_file(p, layer="cells") for p in shards.shard_paths(b / "cells.gpkg", EXTRACT_SHARDS)]
    assert all(len(p) > 0 for p in parts) and sum(map(len, parts)) == len(gpd.read_file(b / "cells.gpkg"))
    # a shard re-run resumes: nothing extracted again, the same partial index
    out = run(["generate_fr_ua_aerial_data.py", "--shard", f"1/{EXTRACT_SHARDS}"], root, "B").stdout
    assert f"(0 extracted, {len(parts[0])} already there)" in out, out
    pd.testing.assert_frame_equal(gpd.read_file(shards.shard_path(b / "cells.gpkg", 1, EXTRACT_SHARDS)), parts[0])


def test_sharded_maps_equal_unsharded(world):
    root, _, _ = world
    a, b = root / "A" / "ses", root / "B" / "ses"
    assert_same_files(a, b, "*/cams/*.tif")
    for city in CITIES:
        assert_same_table(a / city / "polygon_stats.gpkg", b / city / "polygon_stats.gpkg", "polygon_stats")
        assert_same_files(a / city, b / city, "landuse_summary.csv")
        assert_same_files(a / city, b / city, "figures/*.png")
        assert len(list((b / city).glob("polygon_stats.shard-*-of-2.gpkg"))) == CAM_SHARDS
        for merged_or_not in (a, b):  # both open styled in QGIS
            with sqlite3.connect(merged_or_not / city / "polygon_stats.gpkg") as con:
                assert con.execute("SELECT f_table_name FROM layer_styles WHERE useAsDefault").fetchall() == \
                    [("polygon_stats",)]
    assert_same_files(a, b, "landuse_*")  # pooled summary and its figure


def test_merge_names_the_missing_shards(tmp_path):
    proc = run(["generate_fr_ua_aerial_data.py", "--merge", "5"], tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(err) == 1, proc.stderr
    assert "5 of 5 shard outputs missing (shard 1, 2, 3, 4, 5" in err[0] and "--shard 1/5" in err[0]
    assert not (tmp_path / "A" / "ses" / "cells.gpkg").exists()


@pytest.mark.parametrize("value", ["3/2", "0/0", "x"])
def test_bad_shard_value_exits_2_with_one_line(value, capsys):
    parser = shards.add_shard_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--shard", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --shard '{value}'"), err
    assert parser.parse_args(["--merge", "3"]).merge == 3 and parser.parse_args(["--shard", "2/3"]).shard == (2, 3)


def test_script_rejects_a_bad_shard(tmp_path):
    proc = run(["generate_fr_ua_aerial_data.py", "--shard", "3/2"], tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err == ["error: --shard '3/2': shards are numbered 1 to N, so I must be in "
                                            "1..2, e.g. --shard 1/2"], proc.stderr
    assert not (tmp_path / "A").exists()


# ----------------------------------------------------------------------------------- torchrun trainer

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_ses_model_loads_evaluates_and_maps(world):
    root, ddp, _ = world
    if ddp.returncode != 0 and "efficientnet_training" not in ddp.stderr + ddp.stdout:
        pytest.skip(f"torchrun could not start here: {ddp.stderr[-300:]}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from urbanlens.ses import data as ses_data
    from urbanlens.ses import model as ses_model

    for city in CITIES:
        city_dir = root / "A" / "ses" / city
        summary = json.loads((city_dir / "metrics.json").read_text())
        best = summary["best_fold"]
        fold = json.loads((city_dir / f"fold_{best}" / "metrics.json").read_text())
        assert fold["n_test"] > 0 and fold["epochs_run"] == 1 and np.isfinite(fold["val_loss"])
        assert 0.0 <= fold["accuracy"] <= 1.0 and 0.0 <= fold["auc_poor_rich"] <= 1.0
        # the checkpoint loads and, on its held-out cells, gives the probabilities the trainer wrote
        model, ckpt = ses_model.load_ses_model(city_dir / f"fold_{best}" / "best.pt")
        preds = pd.read_csv(city_dir / "predictions.csv")
        assert len(preds) == summary["n_cells"]
        held = preds[preds["fold"] == best]
        cells = gpd.read_file(root / "A" / "ses" / "cells.gpkg", layer="cells").set_index("cell_id")
        x = torch.stack([ses_data.load_cell_image(root / "A" / "ses" / cells.loc[c, "path"], 32) for c in held["cell_id"]])
        with torch.no_grad():
            p = model.eval()(x).exp().numpy()
        np.testing.assert_allclose(p, held[[f"p_{k}" for k in range(5)]].to_numpy(), rtol=1e-4, atol=1e-6)
        # the activation-map stage ran on this model: one GeoTIFF per cell
        assert len(list((city_dir / "cams").glob("*.tif"))) == len(preds)


def test_frozen_folds_keep_the_backbone_they_were_built_with(world):
    """ses.train.freeze=backbone (the model of results A, under torchrun or, where it cannot start, in one
    process): every fold checkpoint holds the backbone its fold was built with, tensor for tensor, and a
    sigmoid unit that learned; the cities' embeddings are cached."""
    from urbanlens.core import runtime
    from urbanlens.core.config import load_config
    from urbanlens.ses import folds as ses_folds
    from urbanlens.ses import model as ses_model

    root, _, _ = world
    cfg = load_config(ROOT / CONFIG, FROZEN)
    for city in CITIES:
        assert (root / "A" / "ses" / "embeddings" / f"{city}.pt").is_file()
        for k in range(cfg.ses.train.folds):
            trained = torch.load(root / "A" / "ses" / city / f"fold_{k}" / "best.pt", map_location="cpu",
                                 weights_only=False)["model"]
            runtime.seed_everything(ses_folds.fold_seed(cfg.seed, city, k))  # as the trainer seeds each fold
            for name, initial in ses_model.build_ses_model(cfg).state_dict().items():
                assert torch.equal(initial, trained[name]) != name.startswith("fc."), (city, k, name)
