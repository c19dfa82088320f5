"""Synthetic cities world: planted twins, plausible images, determinism, skip and rebuild."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from urbanlens.cities.patches import parse_city_folder
from urbanlens.cities.world import STYLE_KEYS, city_styles, generate_world, style_vector
from urbanlens.cities.world_render import render_image
from urbanlens.core import errors
from urbanlens.core.config import load_config
from urbanlens.core.files import read_json
from script_runner import CONF


def tiny_cfg(data: Path, *extra: str):
    """The built-in defaults with the smallest world (tests/conf/cities_world.yaml), data in ``data``."""
    return load_config(CONF / "cities_world.yaml", [f"paths.data={data}", *extra])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("n", [8, 9, 45])
def test_twins_are_each_others_nearest_neighbour(n):
    styles = city_styles(n, seed=3, twin_distance=0.15)
    codes = [s["iata"] for s in styles]
    assert len(set(codes)) == n and all(len(c) == 3 and c.isalpha() and c.isupper() for c in codes)
    vec = np.stack([style_vector(s) for s in styles])
    assert vec.min() >= 0 and vec.max() <= 1
    d = np.linalg.norm(vec[:, None] - vec[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    paired = [s for s in styles if s["twin"]]
    assert len(paired) == 2 * (n // 2)
    for i, s in enumerate(styles):
        if s["twin"] is None:
            continue
        j = codes.index(s["twin"])
        assert styles[j]["twin"] == s["iata"]
        assert d[i, j] == pytest.approx(0.15, abs=1e-3)       # centres stay inside the cube
        others = np.delete(d[i], [i, j])
        assert others.min() > 2.5 * d[i, j]                    # non-twins clearly farther


def test_twin_distance_zero_makes_identical_styles():
    a, b = city_styles(2, seed=0, twin_distance=0.0)
    assert np.array_equal(style_vector(a), style_vector(b)) and a["iata"] != b["iata"]


def test_render_looks_like_a_map_not_noise():
    style = city_styles(2, seed=1, twin_distance=0.1)[0]
    img = render_image(style, np.random.default_rng(0), 128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    g = img.astype(float).mean(axis=2)
    # neighbouring pixels are strongly correlated (flat roofs, streets), unlike noise
    r = np.corrcoef(g[:, :-1].ravel(), g[:, 1:].ravel())[0, 1]
    assert r > 0.6
    # several distinct surfaces: dark asphalt, bright roofs or pavement, a spread of tones
    assert np.percentile(g, 5) < 90 and np.percentile(g, 95) > 120
    again = render_image(style, np.random.default_rng(0), 128)
    assert np.array_equal(img, again)
    other = render_image(style, np.random.default_rng(1), 128)
    assert not np.array_equal(img, other)


def test_twins_look_closer_than_strangers():
    styles = city_styles(4, seed=0, twin_distance=0.1)
    mean_rgb = [np.mean([render_image(s, np.random.default_rng(k), 96).reshape(-1, 3).mean(0)
                         for k in range(3)], axis=0) for s in styles]
    d = lambda i, j: np.linalg.norm(mean_rgb[i] - mean_rgb[j])   # noqa: E731
    assert d(0, 1) < min(d(0, 2), d(0, 3)) and d(2, 3) < min(d(2, 0), d(2, 1))


def test_world_layout_truth_and_determinism(tmp_path):
    a = generate_world(tiny_cfg(tmp_path / "a"))
    b = generate_world(tiny_cfg(tmp_path / "b", "workers=2"))
    fa, fb = _files(a), _files(b)
    assert fa == fb                                            # byte-identical, serial or parallel
    jpgs = [p for p in fa if p.endswith(".jpg")]
    assert len(jpgs) == 4 * 2 * 1
    for p in jpgs:
        city, site, image = p.split("/")[1:]
        name, iata = parse_city_folder(city)
        assert site in ("site_01", "site_02") and image == "img_01.jpg"
    with Image.open(a / jpgs[0]) as im:
        assert im.size == (160, 160)
    truth = read_json(a / "truth.json")
    assert truth["seed"] == 0 and truth["world"]["n_cities"] == 4
    assert len(truth["twins"]) == 2 and set(truth["cities"]) == {c for t in truth["twins"] for c in t}
    assert set(STYLE_KEYS) <= set(truth["cities"][truth["twins"][0][0]])
    c = generate_world(tiny_cfg(tmp_path / "c", "seed=1"))
    assert _files(c) != fa


def test_world_skips_when_built_and_rebuilds_on_change(tmp_path, capsys):
    root = generate_world(tiny_cfg(tmp_path))
    img = next((root / "raw").rglob("*.jpg"))
    mtime = img.stat().st_mtime_ns
    (root / "patches").mkdir()
    generate_world(tiny_cfg(tmp_path))
    assert "world exists" in capsys.readouterr().out
    assert img.stat().st_mtime_ns == mtime and (root / "patches").is_dir()
    generate_world(tiny_cfg(tmp_path, "cities.world.n_cities=2"))
    assert len(list((root / "raw").iterdir())) == 2          # old cities gone
    assert not (root / "patches").exists()                    # stale patches gone


def test_world_refuses_to_overwrite_foreign_images(tmp_path):
    foreign = tmp_path / "cities" / "raw" / "Astana (NQZ)" / "site_01"
    foreign.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(foreign / "img.jpg")
    with pytest.raises(errors.StaleRun, match="did not make"):
        generate_world(tiny_cfg(tmp_path))
