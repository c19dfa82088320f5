"""The uint8 training store: round trip, staleness, and items equal to the per-item paths they replace."""
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from urbanlens.cities import data as cities_data
from urbanlens.core import batch_ops, errors, store
from urbanlens.ses import data as ses_data
from urbanlens.ses import fitting
from script_runner import TORCHRUN, run


ROOT = Path(__file__).resolve().parents[2]


def textured(rng, px: int) -> np.ndarray:
    """An RGB image with gradients and noise (not min-max trivial)."""
    yy, xx = np.mgrid[0:px, 0:px]
    base = np.stack([xx * 3, yy * 2, (xx + yy)], -1) % 200 + 20
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four JPEG patches of 96 px and four PNG cells of 64 px (the last one constant)."""
    root, rng = tmp_path_factory.mktemp("store_src"), np.random.default_rng(0)
    jpgs, pngs = [], []
    for i in range(4):
        jpgs.append(root / f"p{i}.jpg")
        Image.fromarray(textured(rng, 96)).save(jpgs[-1], quality=90)
        pngs.append(root / f"c{i}.png")
        Image.fromarray(textured(rng, 64) if i < 3 else np.full((64, 64, 3), 77, np.uint8)).save(pngs[-1])
    return jpgs, pngs


def chw(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_round_trip_and_pickled_dataset_carries_no_pixels(images, tmp_path):
    _, pngs = images
    mm, built = store.ensure(tmp_path / "s", pngs, chw, (3, 64, 64), {"v": 1}, desc=None)
    assert built and mm.dtype == np.uint8 and mm.shape == (4, 3, 64, 64)
    ds = store.StoreDataset(tmp_path / "s", 4, (3, 64, 64), [0, 1, 2, 3]).subset([2, 0])
    for j, i in enumerate([2, 0]):
        x, y = ds[j]
        assert x.dtype == torch.uint8 and torch.equal(x, chw(pngs[i])) and int(y) == i
    assert len(pickle.dumps(ds)) < 3 * 64 * 64  # workers get the path, not the bytes
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0][0], chw(pngs[2]))


def test_stale_store_is_rebuilt_never_read(images, tmp_path):
    _, pngs = images
    path, shape = tmp_path / "s", (3, 64, 64)
    assert store.ensure(path, pngs, chw, shape, {"v": 1}, None)[1]
    assert not store.ensure(path, pngs, chw, shape, {"v": 1}, None)[1]  # same files and settings: reused
    assert store.changes(path, pngs, shape, {"v": 2}) == ["decode.v"]
    assert store.changes(path, pngs[::-1], shape, {"v": 1}) == ["input sources modified"]  # order counts
    assert store.changes(path, pngs[:3], shape, {"v": 1}) == ["input sources modified"]
    st = os.stat(pngs[0])
    os.utime(pngs[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-extracted cell
    try:
        assert store.changes(path, pngs, shape, {"v": 1}) == ["input sources modified"]
    finally:
        os.utime(pngs[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    data, stamp = store.paths(path)
    with open(data, "r+b") as f:
        f.truncate(100)
    assert store.changes(path, pngs, shape, {"v": 1})  # a damaged data file is not used

    def broken(f):
        if f == pngs[2]:
            raise RuntimeError("killed")
        return chw(f)

    with pytest.raises(RuntimeError):
        store.build(path, pngs, broken, shape, {"v": 1}, None)
    assert not stamp.exists() and store.changes(path, pngs, shape, {"v": 1})  # an interrupted build: no store
    with pytest.raises(Exception, match="uint8"):
        store.build(path, pngs, lambda f: chw(f)[:, :32], shape, {"v": 1}, None)


def test_cities_store_batches_equal_the_per_item_transforms(images, tmp_path):
    jpgs, _ = images
    size = 72
    store.ensure(tmp_path / "c", jpgs, lambda f: cities_data.decode_for_store(f, size), (3, size, size),
                 cities_data.STORE_SETTINGS, None)
    ds = store.StoreDataset(tmp_path / "c", 4, (3, size, size), range(4))
    batch = torch.stack([ds[i][0] for i in range(4)])
    old = cities_data.PatchDataset(jpgs, range(4), cities_data.transforms(size, train=False), decode_size=size)
    ref = torch.stack([old[i][0] for i in range(4)])
    assert torch.equal(cities_data.eval_batches(batch), ref)  # identical, not just close
    trained = cities_data.train_batches(seed=3, epoch=1)(batch)
    for a, r in zip(trained, ref):
        assert any(torch.equal(a, v) for v in (r, r.flip(-1), r.flip(-2), r.flip(-1).flip(-2)))
    again = cities_data.train_batches(seed=3, epoch=1)(batch)
    assert torch.equal(trained, again)  # the flips of an epoch are a function of (seed, epoch, rank)
    epochs = [cities_data.train_batches(seed=3, epoch=e)(batch) for e in range(2, 6)]
    assert any(not torch.equal(trained, e) for e in epochs)  # other epochs, other flips


@pytest.mark.parametrize("size", [64, 96])
def test_ses_store_batches_equal_load_cell_image(images, tmp_path, size):
    _, pngs = images
    ds = ses_data.cell_store(pngs, [0, 1, 2, 3], size, tmp_path / "cells", None)
    loader = fitting.cell_loader(ds.subset([0, 1, 2, 3]), 4, torch.device("cpu"))
    (x, y), = list(loader)
    ref = torch.stack([ses_data.load_cell_image(p, size) for p in pngs])
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 3]
    if size == 64:
        assert torch.equal(x, ref)
    else:  # resized on the batch: the same float operations, within rounding
        assert float((x - ref).abs().max()) <= 1e-6
    assert torch.equal(x[3], torch.zeros_like(x[3]))  # a constant cell scales to zeros, as before
    assert torch.all(x[:3].amin((1, 2, 3)) == 0) and torch.all(x[:3].amax((1, 2, 3)) == 1)


def test_device_normalisation_equals_torchvision_per_item():
    x = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    per_item = cities_data.transforms(20, train=False)
    assert torch.equal(batch_ops.imagenet_normalize(x), torch.stack([per_item(i) for i in x]))


def test_parallel_build_equals_serial_and_stops_on_a_bad_item(images, tmp_path):
    _, pngs = images
    files, shape = pngs * 5, (3, 64, 64)  # 20 items: several chunks per worker
    serial = np.array(store.build(tmp_path / "a", files, chw, shape, {"v": 1}, None, workers=0))
    parallel = np.array(store.build(tmp_path / "b", files, chw, shape, {"v": 1}, None, workers=2))
    assert np.array_equal(serial, parallel) and np.array_equal(serial[5], chw(pngs[1]).numpy())
    with pytest.raises(errors.DataError, match="uint8"):  # a worker's error reaches the caller, typed
        store.build(tmp_path / "c", files, lambda f: chw(f)[:, :32], shape, {"v": 1}, None, workers=2)
    assert store.changes(tmp_path / "c", files, shape, {"v": 1})  # and leaves no store
    assert np.array(store.build(tmp_path / "e", [], chw, shape, {"v": 1}, None, workers=2)).shape == (0, *shape)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_store_build_under_torchrun_outlasts_the_process_group_timeout(tmp_path):
    """2 CPU ranks, process-group timeout 2 s, a store of 40 items at 0.25 s each (10 s of decoding,
    2.5 s per rank with 2 workers each): built together, no rank times out and every rank reads every
    item; built by rank 0 alone while the other waits at a barrier (the trainers' old way), the waiting
    rank times out."""
    for i in range(40):
        (tmp_path / f"{i}.src").write_text("x")
    cmd = [*TORCHRUN, "--nproc_per_node", "2", ROOT / "tests" / "ddp_store_build.py", tmp_path, "2", "0.25", "2"]
    proc = run(cmd, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = re.findall(r"shared rank (\d)/2: built=True seconds=([\d.]+) items_ok=True", proc.stdout)
    assert sorted(r for r, _ in shared) == ["0", "1"], proc.stdout
    assert all(float(s) > 2 for _, s in shared)  # each rank's share alone outlasts the timeout
    assert "rank0 rank 1/2: failed" in proc.stdout and "timed out" in proc.stdout.lower(), proc.stdout
