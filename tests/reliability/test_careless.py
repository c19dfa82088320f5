"""What a hurried user meets first: a successful stage prints no traceback (pool workers stopped as the
pool closes), small cities and contradicting settings are refused in one line, run.sh answers its own
flags."""
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from urbanlens.cities import patches as city_patches
from urbanlens.core import schema
from urbanlens.core.config import load_config
from urbanlens.core.errors import ConfigError, DataError
from urbanlens.core.placement import Placement
from urbanlens.ses import data as ses_data
from urbanlens.ses import fitting
from urbanlens.ses import folds as ses_folds
from urbanlens.ses import spatial_folds

from script_runner import assert_no_traceback, python, run  # tests/ is on the path under pytest

# a stage whose forked worker is stopped with SIGTERM, as multiprocessing.Pool does when it closes
_WORKER_STOPPED = textwrap.dedent("""
    import multiprocessing as mp
    from urbanlens.core import entry

    def wait(ready):
        ready.set()
        mp.Event().wait(30)

    def main():
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        worker = ctx.Process(target=wait, args=(ready,))
        worker.start()
        ready.wait(30)
        worker.terminate()
        worker.join(30)
        print("worker exit", worker.exitcode)

    entry.run(main)
""")


def test_a_worker_stopped_by_its_pool_ends_quietly():
    proc = run(python("-c", _WORKER_STOPPED), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert "worker exit -15" in proc.stdout and "KeyboardInterrupt" not in proc.stderr


# ----------------------------------------------------------------------------- small cities


def _labels(per_class):
    return np.repeat(np.arange(5), per_class)


def test_a_city_too_small_for_its_validation_share_is_refused_naming_what_fits():
    labels = _labels([3, 3, 3, 3, 3])  # 5 folds leave 2 training cells a quintile: fine; 3 folds leave 2 too
    assert len(ses_folds.stratified_folds(labels, 3, 0.2, seed=0)) == 3
    with pytest.raises(DataError) as err:  # 3 folds: 1 or 2 training cells a quintile, no stratified validation
        ses_folds.stratified_folds(_labels([3, 3, 3, 3, 2]), 2, 0.2, seed=0, where="cells.gpkg: Lille")
    msg = str(err.value)
    assert msg.startswith("cells.gpkg: Lille: too small for ses.train.folds=2 with ses.train.val_share=0.2")
    assert "14 cells, 3/3/3/3/2 cells per income quintile" in msg and "add cells" in msg


def test_a_city_with_fewer_cells_in_a_quintile_than_folds_gets_the_folds_that_fit():
    labels = _labels([6, 6, 6, 6, 4])
    with pytest.raises(DataError) as err:
        ses_folds.stratified_folds(labels, 5, 0.2, seed=0, where="cells.gpkg: Nice")
    msg = str(err.value)
    assert "Nice" in msg and "6/6/6/6/4 cells per income quintile" in msg and "set ses.train.folds=" in msg
    k = int(msg.split("set ses.train.folds=")[1].split(",")[0])
    assert len(ses_folds.stratified_folds(labels, k, 0.2, seed=0)) == k   # the setting named does fit


def test_spatial_and_city_folds_refuse_small_input_in_one_line():
    from urbanlens.ses import grid
    ids = [grid.inspire_id(3_800_000 + 200 * i, 3_000_000 + 2000 * (i % 3)) for i in range(6)]
    with pytest.raises(DataError) as err:
        spatial_folds.spatial_folds(ids, [0, 1, 2, 3, 4, 4], 2, 0.9, 1000.0, 0.0, seed=0, where="Lyon")
    assert "Lyon: too small" in str(err.value) and "per income quintile" in str(err.value)
    with pytest.raises(DataError) as err:
        spatial_folds.leave_city_out(["a", "a", "b", "b"], [0, 1, 0, 1], "b", 0.9, seed=0, where="pool")
    assert "cities other than b hold 2 cells" in str(err.value)


# ----------------------------------------------------------------------------- keys that contradict each other


@pytest.mark.parametrize("sets, keys", [
    (["ses.cams.poor_class=2", "ses.cams.rich_class=2"], ("ses.cams.poor_class", "ses.cams.rich_class")),
    (["cities.image.scale_min=300", "cities.image.scale_max=200"], ("cities.image.scale_min", "cities.image.scale_max")),
    (["ses.train.cv=spatial", "ses.train.block_m=400", "ses.train.buffer_m=400"], ("ses.train.buffer_m", "ses.train.block_m")),
    (["ses.train.cv=spatial", "ses.train.block_m=100"], ("ses.train.block_m", "ses.cell_size_m")),
])
def test_contradicting_keys_are_refused_naming_both(sets, keys):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    msg = str(err.value)
    assert all(f"'{k}'" in msg for k in keys) and "\n" not in msg


def test_ordered_pairs_that_agree_pass():
    cfg = load_config(None, ["ses.cams.poor_class=1", "ses.cams.rich_class=3", "cities.image.scale_min=0", "cities.image.scale_max=1",
                             "ses.train.cv=stratified", "ses.train.buffer_m=5000", "cities.patch.size=100", "cities.patch.stride=100"])
    assert cfg.ses.cams.rich_class == 3 and cfg.ses.train.buffer_m == 5000   # the buffer matters under cv: spatial only


def test_a_cam_needs_a_feature_map_of_two_by_two():
    assert schema.cam_map_problem("cities.model.input_size", 64) is None
    line = schema.cam_map_problem("cities.model.input_size", 48, "cities.patch.size")
    assert "'cities.model.input_size' is 48" in line and "'cities.patch.size'" in line and "1 x 1" in line and "at least 64" in line


# ----------------------------------------------------------------------------- run.sh's own usage

def _run_sh(*args):
    return run(["bash", "run.sh", *args], timeout=30)


def test_run_sh_prints_its_own_usage_listing_every_command():
    proc = _run_sh("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash run.sh")
    for command in ("demo", "setup", "test", "cities", "ses", "bench", "gpu-check"):
        assert f"\n  {command}" in proc.stdout or f"| {command}" in proc.stdout, command


@pytest.mark.parametrize("args, says", [
    (("nosuch",), "error: bash run.sh nosuch: unknown command 'nosuch'"),
    (("ses", "--sett", "ses.train.epochs=1"), "error: bash run.sh ses: unknown flag '--sett' (did you mean --set?)"),
    (("cities", "--conifg", "configs/cities.yaml"), "unknown flag '--conifg' (did you mean --config?)"),
    (("ses", "--set", "ses.train.epochs"), "--set ses.train.epochs: expected KEY=VALUE"),
    (("cities", "--config"), "--config needs a value"),
    (("ses", "configs/ses.yaml"), "unexpected argument 'configs/ses.yaml'"),
])
def test_run_sh_names_the_mistake_before_setting_anything_up(args, says):
    proc = _run_sh(*args)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr.splitlines()[0] and "usage: bash run.sh" in proc.stderr
    assert "[setup]" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- training meets a last batch of one, a damaged image


def test_precise_batch_norm_statistics_skip_a_last_batch_of_one():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.manual_seed(0)
    batches = [(torch.randn(3, 3, 8, 8) + 2, None), (torch.randn(1, 3, 8, 8) - 50, None)]
    fitting.recompute_bn_stats(model, batches, Placement("cpu"))
    with torch.no_grad():
        expected = model[0](batches[0][0]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected, rtol=1e-4, atol=1e-4)  # the lone image left out


def test_a_damaged_cell_image_met_in_a_loader_worker_is_one_line_naming_it(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(good)
    raw = good.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # cut short, as a copy interrupted after the extraction checked it
    dataset = ses_data.CellDataset([good, bad], [0, 1], 16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: cannot read as an image") and "re-run generate_fr_ua_aerial_data.py" in msg
    assert "Traceback" not in msg and "worker process" not in msg


# ----------------------------------------------------------------------------- a full disk while cutting patches

_FULL_DISK = textwrap.dedent("""
    import errno, sys
    from pathlib import Path
    import numpy as np, pandas as pd
    from PIL import Image
    from urbanlens.cities import cutting, rasters
    from urbanlens.core import entry
    from urbanlens.core.config import load_config

    tmp = Path(sys.argv[1])
    for code in ("AAA", "BBB"):
        (tmp / "raw" / code).mkdir(parents=True)
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp / "raw" / code / "img.png")
    plan = pd.DataFrame({"source": ["AAA/img.png", "BBB/img.png"], "path": ["train/AAA/p.jpg", "train/BBB/p.jpg"],
                         "split": "train", "y": 0, "x": 0, "size": 32, "city": ["A", "B"], "iata": ["AAA", "BBB"]})

    def full(self, fp, *args, **kwargs):  # every patch write meets a full disk (inherited by forked workers)
        raise OSError(errno.ENOSPC, "No space left on device")

    Image.Image.save = full
    opts = rasters.options(load_config(None))
    entry.run(lambda: cutting.cut(plan, tmp / "raw", tmp / "out", opts, workers=2, progress=False, drop_constant=False))
""")


def test_a_full_disk_while_cutting_patches_names_the_path(tmp_path):
    proc = run(python("-c", _FULL_DISK, tmp_path), timeout=600)  # a loaded CI machine starts torch slowly
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'out' / 'train'}") and "no space left" in line and "df -h" in line


# ----------------------------------------------------------------------------- files an input folder does not use


def test_the_raw_folder_lists_every_file_it_does_not_use_and_why(tmp_path):
    raw = tmp_path / "raw"
    site = raw / "Lille (LIL)" / "site_01"
    (site / "more").mkdir(parents=True)
    (raw / "Lille (LIL)" / "site_02").mkdir()
    for p in (site / "a.jpg", site / "a.tfw", site / ".hidden.jpg", raw / "Lille (LIL)" / "site_02" / "b.png"):
        p.write_bytes(b"x")
    assert city_patches.unused_inputs(raw) == []                          # images, a world file, a hidden file
    for p in (raw / "notes.jpg", raw / "Lille (LIL)" / "loose.jpg", site / "more" / "c.jpg", site / "more" / "d.jpg",
              site / "e.bmp"):
        p.write_bytes(b"x")
    lines = city_patches.unused_inputs(raw)
    assert len(lines) == 4, lines
    assert any("loose in the raw folder" in line and line.endswith(str(raw / "notes.jpg")) for line in lines)
    assert any("loose in a city folder" in line and "loose.jpg" in line for line in lines)
    assert any(line.startswith("2 file(s) in a folder nested inside a site folder") and "and 1 more" in line
               for line in lines)
    assert any("format the reader does not take" in line and "e.bmp" in line for line in lines)


def test_a_new_city_folder_names_the_files_of_formats_it_does_not_read(tmp_path):
    from urbanlens.cities import newplace
    (tmp_path / "a").mkdir()
    for name in ("a/x.jp2", "a/x.j2w", "y.webp", "notes.txt", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    assert newplace.unused_files(tmp_path) == [tmp_path / "notes.txt", tmp_path / "y.webp"]
