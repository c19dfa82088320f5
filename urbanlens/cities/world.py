"""Synthetic satellite views of cities with planted look-alike pairs ("twins").

Each city is a point in a normalised style space ``[0, 1]^D`` (street-grid orientation and spacing,
street width, lot and building size, building density, vegetation, water, roof palette, pavement
colour, building height, street irregularity). Cities come in pairs: twin B is twin A moved by
``cities.world.twin_distance`` in a random direction, while pair centres are spread far apart, so the
planted truth "which cities look alike" is known. Sites of a city stray from its style by
``cities.world.site_jitter``; every image is drawn procedurally from its site's style with its own seeded
random generator, so the same seed and config give byte-identical files.

Drawing is vectorised numpy on pixel coordinates: every layer (street grid, lots, buildings, shadows,
trees, parks, river) is a function of (x, y) and a few small per-image random tables, evaluated in
horizontal strips so that 4800 x 4800 images need only a few hundred MB.

    python -m urbanlens.cities.world --config configs/cities_demo.yaml [--set cities.world.n_cities=12]
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..core import runs
from ..core.config import cli, data_dir
from ..core.errors import ConfigError, StaleRun
from ..core.files import atomic_path, read_json, save_run_config, write_json
from .world_render import STYLE_KEYS, render_image

MARGIN = 0.1  # pair centres stay this far inside the unit cube so twin offsets rarely need clipping


_ONSETS = ["b", "d", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "g", "f", "h", "j", "sh", "tr", "br", "kh"]


_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ia", "ou", "ai"]


_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "nd", "sk"]


_PREFIXES = ["Port", "San", "New", "Nova", "Alt", "Ust"]


def _city_name(rng: np.random.Generator) -> str:
    word = ""
    while not 4 <= len(word) <= 9:
        syll = 2 + int(rng.random() < 0.3)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syll))
    word = word.capitalize()
    if rng.random() < 0.15:
        word = f"{rng.choice(_PREFIXES)} {word}"
    return word


def _iata(name: str, taken: set[str], rng: np.random.Generator) -> str:
    """A plausible code: the name's first letter plus two later letters (consonants first)."""
    letters = [c for c in name.upper() if c.isalpha()]
    first, rest = letters[0], letters[1:]
    consonants = [c for c in rest if c not in "AEIOU"]
    candidates = []
    for pool in (consonants, rest):
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                candidates.append(first + pool[i] + pool[j])
    for code in candidates:
        if code not in taken:
            return code
    while True:
        code = first + "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 2))
        if code not in taken:
            return code


def _spread_points(n: int, dim: int, rng: np.random.Generator, lo: float, hi: float, tries: int = 64) -> np.ndarray:
    """``n`` points in ``[lo, hi]^dim`` spread apart by best-candidate sampling."""
    pts = [rng.uniform(lo, hi, dim)]
    for _ in range(n - 1):
        cand = rng.uniform(lo, hi, (tries, dim))
        d = np.linalg.norm(cand[:, None, :] - np.asarray(pts)[None], axis=-1).min(axis=1)
        pts.append(cand[int(np.argmax(d))])
    return np.asarray(pts[:n]).reshape(n, dim)


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def style_vector(style: dict) -> np.ndarray:
    """The normalised style parameters of a city (or site) as a vector in STYLE_KEYS order."""
    return np.array([style[k] for k in STYLE_KEYS], dtype=float)


def city_styles(n_cities: int, seed: int, twin_distance: float) -> list[dict]:
    """Names, IATA codes and normalised styles of ``n_cities`` cities in twin pairs.

    Each dict holds ``name``, ``iata``, ``twin`` (the twin's IATA code, or None for the odd city out)
    and one value in [0, 1] per key of STYLE_KEYS. Twin B = twin A + ``twin_distance`` * a random unit
    vector (clipped to the cube); pair centres are spread apart, so non-twins are much farther.
    """
    if n_cities < 2:
        raise ConfigError(f"cities.world.n_cities must be at least 2, got {n_cities}")
    rng = np.random.default_rng([seed, 7001])
    dim = len(STYLE_KEYS)
    n_pairs = n_cities // 2
    centres = _spread_points(n_pairs + n_cities % 2, dim, rng, MARGIN, 1 - MARGIN)
    vectors = []
    for p in range(n_pairs):
        a = centres[p]
        b = np.clip(a + twin_distance * _unit(rng, dim), 0.0, 1.0)
        vectors += [a, b]
    if n_cities % 2:
        vectors.append(centres[-1])
    names, codes = [], set()
    styles = []
    for i, vec in enumerate(vectors):
        name = _city_name(rng)
        while name in names:
            name = _city_name(rng)
        names.append(name)
        code = _iata(name, codes, rng)
        codes.add(code)
        styles.append({"name": name, "iata": code, "twin": None,
                       **{k: round(float(x), 6) for k, x in zip(STYLE_KEYS, vec)}})
    for p in range(n_pairs):
        a, b = styles[2 * p], styles[2 * p + 1]
        a["twin"], b["twin"] = b["iata"], a["iata"]
    return styles


def site_style(style: dict, rng: np.random.Generator, jitter: float) -> dict:
    """A site's style: the city's moved by ``jitter`` in a random direction of style space."""
    vec = np.clip(style_vector(style) + jitter * _unit(rng, len(STYLE_KEYS)), 0.0, 1.0)
    return {**style, **{k: float(x) for k, x in zip(STYLE_KEYS, vec)}}


def city_folder(style: dict) -> str:
    """The raw-layout folder name of a city: ``"City Name (IATA)"``."""
    return f"{style['name']} ({style['iata']})"


def _image_jobs(cfg, root: Path, styles: list[dict]) -> list[tuple]:
    w = cfg.cities.world
    jobs = []
    for ci, style in enumerate(styles):
        for si in range(w.n_sites):
            site = site_style(style, np.random.default_rng([cfg.seed, 7002, ci, si]), w.site_jitter)
            for ii in range(w.images_per_site):
                path = root / "raw" / city_folder(style) / f"site_{si + 1:02d}" / f"img_{ii + 1:02d}.jpg"
                jobs.append((site, [cfg.seed, 7003, ci, si, ii], w.image_size, w.feature_scale,
                             w.jpeg_quality, str(path)))
    return jobs


def _render_job(job: tuple) -> str:
    style, seed, size, scale, quality, path = job
    if not Path(path).exists():
        img = render_image(style, np.random.default_rng(seed), size, scale)
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, quality=quality)
    return path


RUN_KEYS = ("seed", "cities.world")  # what the world is made from


STAMP = "world.stamp.json"  # the run stamp (urbanlens.core.runs) in <paths.data>/cities


def generate_world(cfg) -> Path:
    """Write ``<paths.data>/cities/raw/<City Name (IATA)>/<site>/<image>.jpg`` and ``truth.json``.

    Skips when the world's stamp records the same world config and seed and ``truth.json`` (written
    last) is there. A world built with other settings is replaced (its derived patches too); a build
    that was interrupted resumes.
    """
    root = data_dir(cfg, "cities")
    truth_path, stamp = root / "truth.json", root / STAMP
    if stamp.is_file() or truth_path.is_file():  # a world of this generator, complete or not
        changed = runs.compare(stamp, cfg, RUN_KEYS)
        if not changed and truth_path.is_file():
            print(f"world exists: {truth_path}")
            return root
        if changed:
            print(f"[world] {root} was built with other settings ({runs.summary(changed)}): rebuilding")
            _remove_world(root)
    elif (root / "raw").is_dir() and any((root / "raw").iterdir()):
        raise StaleRun(f"{root / 'raw'}: holds images the generator did not make; "
                         "move them away or point paths.data elsewhere")
    runs.write_stamp(stamp, "python -m urbanlens.cities.world", cfg, RUN_KEYS)
    w = cfg.cities.world
    styles = city_styles(w.n_cities, cfg.seed, w.twin_distance)
    jobs = _image_jobs(cfg, root, styles)
    bar = tqdm(total=len(jobs), desc="world", unit="img")
    if cfg.workers > 1 and len(jobs) > 1:
        with mp.get_context().Pool(min(cfg.workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_render_job, jobs):
                bar.update()
    else:
        for job in jobs:
            _render_job(job)
            bar.update()
    bar.close()
    twins = [[s["iata"], s["twin"]] for s in styles[0::2] if s["twin"]]
    cities = {s["iata"]: {k: v for k, v in s.items() if k != "iata"} for s in styles}
    write_json(truth_path, {"twins": twins, "cities": cities, "style_keys": list(STYLE_KEYS), "seed": cfg.seed,
                            "world": cfg.cities.world.to_dict()})
    return root


NEW_DIR = "new"  # <paths.data>/cities/new/<Name>/<site>/<image>.jpg: held-out cities, outside raw/


NEW_RUN_KEYS = ("seed", "cities.world", "cities.newplace.held_out")  # what the held-out twins are made from


NEW_STAMP = "held_out.stamp.json"


def held_out_picks(n_cities: int, n: int) -> list[int]:
    """Indices of the known cities that get a held-out twin: one city of each pair first (0, 2, 4, ...),
    then the others, ``n`` in all (at most every city)."""
    order = list(range(0, n_cities, 2)) + list(range(1, n_cities, 2))
    return order[:min(n, n_cities)]


def held_out_styles(styles: list[dict], n: int, seed: int) -> list[dict]:
    """A new city for each picked known city: the known city's style under a new name (``twin_of`` its
    IATA code); its sites stray from it by ``cities.world.site_jitter`` like any city's, drawn from other seeds."""
    rng = np.random.default_rng([seed, 7101])
    names = {s["name"] for s in styles}
    out = []
    for ci in held_out_picks(len(styles), n):
        name = _city_name(rng)
        while name in names:
            name = _city_name(rng)
        names.add(name)
        out.append({**styles[ci], "name": name, "iata": None, "twin": None, "twin_of": styles[ci]["iata"],
                    "index": ci})
    return out


def _held_out_jobs(cfg, root: Path, twins: list[dict]) -> list[tuple]:
    w = cfg.cities.world
    jobs = []
    for t in twins:
        ci = t["index"]
        for si in range(w.n_sites):
            site = site_style(t, np.random.default_rng([cfg.seed, 7102, ci, si]), w.site_jitter)
            for ii in range(w.images_per_site):
                path = root / NEW_DIR / t["name"] / f"site_{si + 1:02d}" / f"img_{ii + 1:02d}.jpg"
                jobs.append((site, [cfg.seed, 7103, ci, si, ii], w.image_size, w.feature_scale,
                             w.jpeg_quality, str(path)))
    return jobs


def generate_held_out(cfg) -> Path:
    """Write ``cities.newplace.held_out`` cities the classifier never sees, each a new twin of a known city
    (same renderer, same sizes, its own sites and seeds), as ``<paths.data>/cities/new/<Name>/<site>/
    <image>.jpg``, and ``new/truth.json`` (``held_out``: name, folder, twin_of). Skips when built with
    the same settings; rebuilds when the world or ``cities.newplace.held_out`` changed."""
    root = data_dir(cfg, "cities")
    new, truth_path = root / NEW_DIR, root / NEW_DIR / "truth.json"
    changed = runs.compare(new / NEW_STAMP, cfg, NEW_RUN_KEYS)
    if not changed and truth_path.is_file():
        print(f"held-out cities exist: {truth_path}")
        return new
    if new.is_dir() and (new / NEW_STAMP).is_file():
        shutil.rmtree(new)
    elif new.is_dir() and any(new.iterdir()):
        raise StaleRun(new, "holds images the generator did not make", "move them away or point paths.data elsewhere")
    runs.write_stamp(new / NEW_STAMP, "python -m urbanlens.cities.world --held-out", cfg, NEW_RUN_KEYS)
    twins = held_out_styles(city_styles(cfg.cities.world.n_cities, cfg.seed, cfg.cities.world.twin_distance),
                            cfg.cities.newplace.held_out, cfg.seed)
    for job in tqdm(_held_out_jobs(cfg, root, twins), desc="held-out cities", unit="img"):
        _render_job(job)
    write_json(truth_path, {"held_out": [{"name": t["name"], "folder": f"{NEW_DIR}/{t['name']}",
                                          "twin_of": t["twin_of"]} for t in twins], "seed": cfg.seed})
    return new


def _remove_world(root: Path) -> None:
    for name in ("raw", "patches", "truth.json", STAMP, ".world_building.json", "world_config.yaml"):
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def main() -> None:
    import time

    def options(parser):
        parser.add_argument("--held-out", action="store_true", help="also write cities.newplace.held_out cities the "
                            "classifier never sees, each a new twin of a known city, under <data>/cities/new")

    cfg, args = cli("Build the synthetic cities world (satellite-like views with planted twin cities).",
                    "configs/cities_demo.yaml", options)
    t0 = time.time()
    root = generate_world(cfg)
    save_run_config(cfg, root, "world_config.yaml")
    w = cfg.cities.world
    n = w.n_cities * w.n_sites * w.images_per_site
    print(f"[world] {w.n_cities} cities x {w.n_sites} sites x {w.images_per_site} images "
          f"({n} of {w.image_size} px) in {root} ({time.time() - t0:.1f} s)")
    if args.held_out:
        new = generate_held_out(cfg)
        twins = read_json(new / "truth.json")["held_out"]
        print(f"[world] held-out cities in {new}: " + ", ".join(f"{t['name']} (twin of {t['twin_of']})" for t in twins))


if __name__ == "__main__":
    from ..core.entry import run

    run(main)
