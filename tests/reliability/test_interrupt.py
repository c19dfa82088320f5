"""An interrupted run loses nothing: each long stage is killed (SIGKILL, the whole process group, at a
seeded random point of its working phase) and run again with the same command. The re-run must finish,
skip the work already done (its log says so, finished files keep their mtimes), leave no temporary file,
and give the outputs of an uninterrupted run with the same seed: byte-identical images, GeoTIFFs, CSV
and JSON (timing columns aside), equal tables and equal weights. Training resumes from its last
checkpoint and loses at most the epoch it was in.

Each stage runs twice in the same folder (reference first, moved aside), so even the saved configs,
which name the paths, compare byte for byte."""
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import torch
import yaml

from urbanlens.core import files as u_files
from urbanlens.core.config import load_config
from script_runner import assert_no_traceback, python, run as run_command, script_command, start, without_timings

ROOT = Path(__file__).resolve().parents[2]
RNG = random.Random(20240605)  # draws the kill points
TEMP = re.compile(r"^\..+\.tmp-")
# cities: the e2e test's tiny world, three short epochs
CITIES = ("tests/conf/cities_small.yaml", ["cities.train.epochs=3", "cities.train.max_steps_per_epoch=3"])
# SES: one 1 km city, 64 px cells (tests/conf/ses_tiny.yaml), a from-scratch model with a restart after early stopping
SES = ("tests/conf/ses_tiny.yaml", ["ses.cams.sanity_cells=0", "ses.train.cv=stratified", "ses.train.restarts=1",
                                    "ses.train.early_stop_patience=2", "ses.cams.batch_size=2", "ses.cams.panels=1",
                                    "ses.train.checkpoint_every=1"])  # the state after every epoch (the demo: every 10th)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # progress bars off too (quiet)


# ----------------------------------------------------------------------------------------- running

def command(args, root, config_sets):
    config, sets = config_sets
    return script_command(args, root / "data", root / "results", sets, config)


def run(cmd, root):
    proc = run_command(cmd, env=ENV, quiet=True, timeout=600)
    assert proc.returncode == 0, f"{cmd[1]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert_no_traceback(proc, cmd[1:2])
    return proc.stdout


def run_watched(cmd, root, ready=None, kill_after=0.0):
    """Run ``cmd`` in its own process group. With ``ready``: once ``ready(stdout)`` holds, wait
    ``kill_after`` seconds and SIGKILL the group (the stage and its worker processes), as a scheduler or a
    power cut would. Returns (killed, stdout)."""
    log = root / f"stage-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = start(cmd, env=ENV, quiet=True, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t_ready, deadline = None, time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline and ready is not None:
                if t_ready is None and ready(log.read_text()):
                    t_ready = time.monotonic()
                if t_ready is not None and time.monotonic() >= t_ready + kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True, log.read_text()
                time.sleep(0.02)
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"{cmd[1]} failed:\n{text[-3000:]}"
    return False, text


def interrupt(cmd, root, ready, delay, reset):
    """Kill ``cmd`` ``delay`` seconds after ``ready`` holds. Should it finish first (a faster machine),
    ``reset()`` its outputs and try again sooner."""
    for _ in range(4):
        killed, text = run_watched(cmd, root, ready, delay)
        if killed:
            return text
        reset()
        delay /= 4
    pytest.fail(f"{cmd[1]} always finished before it could be killed")


def count(folder, pattern):
    """A ``ready`` condition: at least n finished files matching ``pattern`` under ``folder``."""
    return lambda n: (lambda _: sum(1 for p in Path(folder).glob(pattern) if not TEMP.match(p.name)) >= n)


def files(folder, skip=()):
    """{relative path: bytes digest} of every file under ``folder`` whose name matches no ``skip`` suffix."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(tuple(skip))}


def mtimes(folder, pattern):
    """{path: mtime} of the finished files (not temporary ones) matching ``pattern`` under ``folder``."""
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob(pattern) if not TEMP.match(p.name)}


def temps(folder):
    return [p for p in Path(folder).rglob(".*") if TEMP.match(p.name)]


def assert_same_log(a, b):
    pd.testing.assert_frame_equal(pd.read_csv(a).drop(columns="seconds"), pd.read_csv(b).drop(columns="seconds"))


def assert_same_weights(a, b):
    wa = torch.load(a, map_location="cpu", weights_only=False)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{a}: {k} differs from the uninterrupted run"


def assert_same_gpkg(a, b, layer):
    pd.testing.assert_frame_equal(gpd.read_file(a, layer=layer), gpd.read_file(b, layer=layer))


# ----------------------------------------------------------------------------------------- worlds

def _world(tmp_path_factory, name: str, conf, module: str):
    """A tiny synthetic world built by ``module`` under a new folder, and its stage command builder."""
    root = tmp_path_factory.mktemp(name)
    cmd = lambda *args: command(args, root, conf)  # noqa: E731
    run(cmd("-m", module), root)
    return root, cmd


@pytest.fixture(scope="module")
def cities(tmp_path_factory):
    """A tiny synthetic cities world (raw images only) and the stage command builder."""
    return _world(tmp_path_factory, "interrupt_cities", CITIES, "urbanlens.cities.world")


@pytest.fixture(scope="module")
def ses_world(tmp_path_factory):
    """A tiny synthetic French world and the stage command builder."""
    return _world(tmp_path_factory, "interrupt_ses", SES, "urbanlens.ses.world")


# ----------------------------------------------------------------------------------------- helpers

def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = start(python("-c", "pass"))
    dead.wait()
    with u_files.atomic_path(tmp_path / "probe.csv") as tmp:
        tmp.write_text("a,b\n")
        mine = tmp.name
    host, pid = re.match(r"^\.probe\.csv\.tmp-(.+)-(\d+)-", mine).groups()
    assert int(pid) == os.getpid()
    stale = tmp_path / f".a.png.tmp-{host}-{dead.pid}-x1y2.png"
    journal = tmp_path / f".b.gpkg.tmp-{host}-{dead.pid}-z3.gpkg-journal"
    live = tmp_path / f".c.png.tmp-{host}-{os.getppid()}-w4.png"      # its writer still runs
    remote = tmp_path / f".d.png.tmp-otherhost-{dead.pid}-v5.png"     # another machine's writer
    for p in (stale, journal, live, remote):
        p.write_bytes(b"partial")
    removed = u_files.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale, journal])
    assert live.exists() and remote.exists() and not stale.exists()


# ----------------------------------------------------------------------------------------- cities

def test_preprocessing_resumes_after_a_kill(cities):
    root, cmd = cities
    patches = root / "data" / "cities" / "patches"
    run_watched(cmd("preprocessing.py"), root)
    reference = root / "patches_ref"
    patches.rename(reference)
    total = len(pd.read_csv(reference / "manifest.csv"))

    ready = count(patches, "*/*/*.jpg")(RNG.randint(1, total // 2))
    interrupt(cmd("preprocessing.py"), root, ready, RNG.uniform(0, 0.05), lambda: shutil.rmtree(patches))
    assert not (patches / "manifest.csv").exists()  # killed before the end
    done = mtimes(patches, "*.jpg")
    log = run(cmd("preprocessing.py"), root)
    assert f"({total - len(done)} written now)" in log
    assert {p: t for p, t in mtimes(patches, "*.jpg").items() if p in done} == done
    assert files(patches) == files(reference)
    assert not temps(patches)


def test_city_training_resumes_from_its_last_epoch(cities):
    root, cmd = cities
    if not (root / "data" / "cities" / "patches" / "manifest.csv").is_file():
        run(cmd("preprocessing.py"), root)
    out = root / "results" / "cities"
    run_watched(cmd("train_classification.py"), root)
    reference = root / "cities_ref"
    out.rename(reference)
    epoch_seconds = pd.read_csv(reference / "train_log.csv")["seconds"].mean()

    k = RNG.randint(1, 2)  # killed during epoch k + 1, at a random point of it
    ready = lambda text: f"[train] epoch {k}:" in text  # noqa: E731
    text = interrupt(cmd("train_classification.py"), root, ready, RNG.uniform(0, epoch_seconds),
                     lambda: shutil.rmtree(out))
    finished = len(re.findall(r"\[train\] epoch \d+:", text))
    saved = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["epoch"]
    assert 1 <= finished <= saved <= finished + 1  # at most the epoch in progress is lost
    log = run(cmd("train_classification.py"), root)  # the same command, no --resume
    assert f"resuming from {out / 'checkpoints' / 'last.pt'} after epoch {saved}" in log
    assert f"({3 - saved} run now)" in log
    assert pd.read_csv(out / "train_log.csv")["epoch"].tolist() == [1, 2, 3]
    assert_same_log(out / "train_log.csv", reference / "train_log.csv")
    for name in ("last.pt", "best.pt"):
        assert_same_weights(out / "checkpoints" / name, reference / "checkpoints" / name)
    assert files(out, skip=("train_log.csv", ".pt")) == files(reference, skip=("train_log.csv", ".pt"))
    assert not temps(out)


def test_a_rerun_continues_only_a_checkpoint_of_the_same_settings():
    from urbanlens.cities import training
    from urbanlens.core import runs
    from urbanlens.core.config import load_config

    cfg = load_config(ROOT / "configs" / "cities_demo.yaml")
    saved = runs.make_stamp("train_classification.py", cfg, training.RUN_KEYS)
    assert runs.differences(saved, cfg, training.RUN_KEYS) == []
    assert runs.differences(saved, load_config(ROOT / "configs" / "cities_demo.yaml",
                                               ["workers=7", "device=cpu", "cities.test.batch_size=3"]), training.RUN_KEYS) == []
    other = load_config(ROOT / "configs" / "cities_demo.yaml", ["cities.train.lr=0.01", "seed=4", "cities.patch.stride=32"])
    assert runs.differences(saved, other, training.RUN_KEYS) == ["seed", "cities.patch.stride", "cities.train.lr"]


# ----------------------------------------------------------------------------------------- SES

def test_extraction_resumes_after_a_kill(ses_world):
    root, cmd = ses_world
    ses = root / "results" / "ses"
    run_watched(cmd("generate_fr_ua_aerial_data.py"), root)
    reference = root / "extract_ref"
    shutil.copytree(ses, reference)
    shutil.rmtree(ses)
    n = len(gpd.read_file(reference / "cells.gpkg", layer="cells"))

    ready = count(ses / "imagery", "*/*.png")(RNG.randint(1, n // 2))
    interrupt(cmd("generate_fr_ua_aerial_data.py"), root, ready, RNG.uniform(0, 0.05), lambda: shutil.rmtree(ses))
    assert not (ses / "cells.gpkg").exists()
    done = mtimes(ses, "*.png")
    log = run(cmd("generate_fr_ua_aerial_data.py"), root)
    assert f"({n - len(done)} extracted, {len(done)} already there)" in log
    assert {p: t for p, t in mtimes(ses, "*.png").items() if p in done} == done
    assert files(ses, skip=(".gpkg",)) == files(reference, skip=(".gpkg",))
    assert_same_gpkg(ses / "cells.gpkg", reference / "cells.gpkg", "cells")
    assert not temps(ses)


def _ses_extracted(root, cmd):
    if not (root / "results" / "ses" / "cells.gpkg").is_file():
        run(cmd("generate_fr_ua_aerial_data.py"), root)


def test_ses_training_resumes_inside_a_fold(ses_world):
    root, cmd = ses_world
    _ses_extracted(root, cmd)
    ses = root / "results" / "ses"
    city = ses / "Paris"
    run_watched(cmd("efficientnet_training.py"), root)
    reference = root / "train_ref"
    city.rename(reference)
    (ses / "training_summary.csv").rename(root / "training_summary_ref.csv")
    epoch_seconds = pd.read_csv(reference / "fold_0" / "train_log.csv")["seconds"].mean()

    fold = RNG.randint(0, 1)  # killed inside this fold, after its first epoch
    ready = lambda _: (city / f"fold_{fold}" / "last.pt").is_file()  # noqa: E731
    interrupt(cmd("efficientnet_training.py"), root, ready, RNG.uniform(0, epoch_seconds),
              lambda: shutil.rmtree(city))
    states = {k: torch.load(city / f"fold_{k}" / "last.pt", map_location="cpu", weights_only=False)
              for k in (0, 1) if (city / f"fold_{k}" / "last.pt").is_file()}
    finished = [k for k in (0, 1) if (city / f"fold_{k}" / "metrics.json").is_file()]
    assert states and len(finished) == fold
    stamps = {k: (city / f"fold_{k}" / "best.pt").stat().st_mtime_ns for k in finished}
    log = run(cmd("efficientnet_training.py"), root)
    for k, state in states.items():  # an interrupted fold continues after its last finished epoch
        assert state["epoch_total"] >= 1 and len(state["log"]) == state["epoch_total"]
        assert f"Paris fold {k}: resuming after epoch {state['epoch_total']}" in log
    for k in finished:  # a finished fold is not trained again
        assert (city / f"fold_{k}" / "best.pt").stat().st_mtime_ns == stamps[k]
    for k in (0, 1):
        fold_dir, ref = city / f"fold_{k}", reference / f"fold_{k}"
        assert not (fold_dir / "last.pt").exists()  # removed once the fold is done
        assert_same_weights(fold_dir / "best.pt", ref / "best.pt")
        assert_same_log(fold_dir / "train_log.csv", ref / "train_log.csv")
        assert (without_timings(u_files.read_json(fold_dir / "metrics.json"))
                == without_timings(u_files.read_json(ref / "metrics.json")))
    assert (without_timings(u_files.read_json(city / "metrics.json"))
            == without_timings(u_files.read_json(reference / "metrics.json")))
    skip = ("train_log.csv", "metrics.json", ".pt")
    assert files(city, skip=skip) == files(reference, skip=skip)
    assert (ses / "training_summary.csv").read_bytes() == (root / "training_summary_ref.csv").read_bytes()
    assert not temps(ses)


def test_activation_maps_resume_after_a_kill(ses_world):
    root, cmd = ses_world
    _ses_extracted(root, cmd)
    ses = root / "results" / "ses"
    city = ses / "Paris"
    if not (city / "metrics.json").is_file():
        run(cmd("efficientnet_training.py"), root)
    outputs = [city / "cams", city / "figures", city / "polygon_stats.gpkg", city / "landuse_summary.csv",
               city / "cams_config.yaml", ses / "landuse_summary.csv", ses / "landuse_scores.png"]
    run_watched(cmd("gradcaming_urban_areas.py"), root)
    reference = root / "cams_ref"
    for p in outputs:
        (reference / p.relative_to(ses)).parent.mkdir(parents=True, exist_ok=True)
        p.rename(reference / p.relative_to(ses))
    n = len(list((reference / "Paris" / "cams").glob("*.tif")))

    def reset():
        for p in outputs:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    ready = count(city / "cams", "*.tif")(RNG.randint(1, n // 2))
    interrupt(cmd("gradcaming_urban_areas.py"), root, ready, RNG.uniform(0, 0.1), reset)
    done = mtimes(city / "cams", "*.tif")
    assert 0 < len(done) < n
    log = run(cmd("gradcaming_urban_areas.py"), root)
    assert f"Paris: {n} cells ({n - len(done)} new maps)" in log
    saved = yaml.safe_load((city / "cams_config.yaml").read_text())  # the run's full resolved config
    assert saved == {**load_config(ROOT / SES[0], cmd()[4::2]).to_dict(), "config_file": SES[0]}
    assert {p: t for p, t in mtimes(city / "cams", "*.tif").items() if p in done} == done
    for p in outputs:
        ref = reference / p.relative_to(ses)
        if p.suffix == ".gpkg":
            assert_same_gpkg(p, ref, "polygon_stats")
        elif p.is_dir():
            assert files(p) == files(ref), p
        else:
            assert p.read_bytes() == ref.read_bytes(), p
    assert not temps(ses)
