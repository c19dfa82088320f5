"""The steps of similar_cities.py for one new city: its folder checked, its images cut as the model's
patches were (or refused), the patches and the known cities' test patches embedded, and the per-patch
outputs (patches.csv, patches.gpkg, nearest_patches.png). The comparison itself is urbanlens.cities.newplace."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy.special import softmax

from ..core import gis_style, loops, runs
from ..core.errors import ConfigError, DataError
from ..core.files import atomic_path, save_figure, write_csv
from . import data, figures, newplace, patches, rasters, training

RUN_KEYS = ("seed", "cities.image", "cities.patch", "cities.test.split", "cities.newplace")  # what the outputs depend on, besides the inputs


def embed(model, dataset, cfg, place, desc):
    """Logits, penultimate embeddings and labels of ``dataset`` (progress bar ``desc``)."""
    loader = loops.make_loader(dataset, cfg.cities.test.batch_size, cfg.workers, place.device)
    return loops.predict(model, loader, place, embeddings=True, desc=desc)


def new_city(cfg, args) -> tuple[str, ...]:
    """The results folder parts of the new city of ``--images`` / ``--name``, checked before anything runs."""
    images = Path(args.images)
    name = args.name or images.resolve().name
    if not images.is_dir() or not newplace.find_images(images):
        raise DataError(images, "no image files (.tif, .png, .jpg) in this folder or below",
                        "point --images at the folder of the new city's images")
    unused = newplace.unused_files(images)
    if unused:  # nothing in the folder is passed over without a word
        print(f"[new city] not used: {len(unused)} file(s) of a format the reader does not take (it takes "
              f"{', '.join(patches.IMAGE_SUFFIXES)}): {unused[0]}" + (f" and {len(unused) - 1} more" if len(unused) > 1 else ""))
    if not name or "/" in name or name.startswith("."):
        raise ConfigError("--name", f"{name!r} is not usable as a folder name", "give a plain name, e.g. --name Bishkek")
    return "cities", "new", name


def cut_like_the_model(cfg, images: Path, patches_dir: Path, best_pt: Path) -> newplace.NewPatches:
    """The new city cut as preprocessing cuts; problems listed (an error under strict), and refused when
    the cut differs from that of the model's patches."""
    opts = rasters.options(cfg)
    new = newplace.cut_new(images, opts, cfg.cities.patch.size, cfg.cities.patch.stride, cfg.cities.patch.max_nodata,
                           cfg.cities.patch.jpeg_quality)
    for problem in new.problems:
        if cfg.strict:
            raise DataError(f"{problem} (strict=true; --set strict=false lists and skips it)")
        print(f"[similar] skipped: {problem}")
    if new.frame.empty:
        raise DataError(images, "no usable patch in these images (see above)", "fix the files listed or lower cities.patch.size")
    known_sources = pd.read_csv(patches_dir / patches.SOURCES)
    differences = newplace.cut_differences(training.patch_settings(cfg.paths.data), cfg, known_sources,
                                           pd.DataFrame(new.sources))
    if differences:
        runs.refuse(best_pt, f"was trained on images cut otherwise than those in {images}", differences,
                    "cut them alike: run with the config the model was trained with (its patches' settings are in "
                    f"{patches_dir / patches.STAMP}), or set cities.patch.ground_m and train a model on patches of that ground size")
    return new


def known_embeddings(model, cfg, known, cache: Path, best_pt: Path, place):
    """The embeddings of the known cities' test patches (dataset ``known``), made once per model and split
    and shared by every new city through ``cache``."""
    key = newplace.known_key(best_pt, cfg.cities.test.split, known.files, place.device.type, cfg.cities.train.amp)
    known_emb = newplace.read_known(cache, key)
    if known_emb is None:
        _, known_emb, _ = embed(model, known, cfg, place, f"known {cfg.cities.test.split} patches")
        newplace.write_known(cache, key, known_emb)
    return known_emb


def write_patches(out: Path, new: newplace.NewPatches, logits, emb, known_emb, known_labels, classes):
    """patches.csv (per patch: predicted city and probability, nearest city by embedding) and, for
    georeferenced images, patches.gpkg (the same with each patch's footprint); returns the latter's frame
    or None."""
    probs = softmax(logits, axis=1)
    near, near_sim = newplace.nearest_city(emb, known_emb, known_labels, len(classes))
    per_patch = new.frame.assign(predicted=[classes[i] for i in logits.argmax(axis=1)], probability=probs.max(axis=1),
                                 nearest_city=[classes[i] for i in near], nearest_similarity=near_sim)
    write_csv(per_patch, out / "patches.csv")
    geo = newplace.footprints(per_patch, new.georef)
    if geo is not None:
        with atomic_path(out / "patches.gpkg") as tmp:
            geo.to_file(tmp, layer="patches", driver="GPKG", engine="pyogrio")
            gis_style.style_gpkg(tmp, "patches", "nearest_similarity")
    return geo


def nearest_panel(path: Path, new: newplace.NewPatches, emb, known, known_emb, top_iata: list, classes, cfg,
                  name: str) -> None:
    """nearest_patches.png: seeded patches spread over the new city's images beside their nearest test
    patches of the ``top_iata`` cities."""
    top_idx = [classes.index(c) for c in top_iata]
    picks = newplace.pick_patches(new.frame["source"].to_numpy(), cfg.cities.newplace.panel_patches, cfg.seed)
    nearest = newplace.nearest_patches(emb, picks, known_emb, known.labels, top_idx)
    save_figure(figures.nearest_patches_figure(
        [newplace.patch_image(new.jpegs[i]) for i in picks],
        [[data.read_image(known.files[k]).permute(1, 2, 0).numpy() for k in row] for row in nearest],
        top_iata, f"{name}: patches beside their nearest {cfg.cities.test.split} patches"), path)
