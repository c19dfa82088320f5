"""Which known cities does a new city look like? A trained city classifier asked about a place it never saw.

The new city's images (--images DIR: any layout of image files, or the raw layout of one city,
<site>/<image>) are cut as preprocessing.py cuts the known cities' (same reader, bands, scaling, ground
size, patch size and stride, blank-patch rule, JPEG quality; settings from the config, which must match
those the model's patches were cut with: a model trained on other bands or another ground size is
refused, naming the difference). The classifier (<results>/cities/checkpoints/best.pt) embeds every
patch and the known cities' test patches (test.split). Writes <results>/cities/new/<NAME>/:
similar_cities.csv (each known city: cosine similarity of the new city's mean embedding to the known
city's mean test embedding, share of the new patches predicted as it, 95 % intervals over resamples of
the new city's source images, share of resamples ranking it first; most similar first),
similar_cities.png, nearest_patches.png (new patches beside their nearest test patches of the top three
cities), patches.csv (per patch: predicted city and probability, nearest city by embedding) and, for
georeferenced images, patches.gpkg (the same with each patch's footprint; opens in QGIS).

    python similar_cities.py --config configs/cities_demo.yaml --images data/demo/cities/new/<Name> [--name NAME]
"""
import os

# CPU threads sleep instead of spinning while they wait (see train_classification.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pandas as pd
from scipy.special import softmax

from urbanlens.cities import data, figures, newplace, patches, rasters
from urbanlens.cities import training as cities_training
from urbanlens.core import entry, gis_style, locks, loops, runs, runtime
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.errors import ConfigError, DataError
from urbanlens.core.files import atomic_path, save_figure, save_run_config, write_csv

RUN_KEYS = ("seed", "image", "patch", "test.split", "newplace")  # what the outputs depend on, besides the inputs


def options(parser):
    parser.add_argument("--images", required=True, help="folder of the new city's images (any layout)")
    parser.add_argument("--name", help="name of the new city (default: the folder's name)")


def embed(model, dataset, cfg, device, desc):
    loader = loops.make_loader(dataset, cfg.test.batch_size, cfg.workers, device)
    return loops.predict(model, loader, device, cfg.train.amp, cfg.train.channels_last, embeddings=True, desc=desc)


def main() -> None:
    cfg, args = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml", options)
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
        raise ConfigError(f"--name '{name}'", "not usable as a folder name", "give a plain name, e.g. --name Bishkek")
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    results = results_dir(cfg, "cities")
    out = results / "new" / name
    entry.keep(locks.hold(out, "similar_cities.py", cfg))

    # 1. The model as trained, and the known cities' test patches it was trained beside.
    model, trained, classes, best_pt, _ = cities_training.trained_classifier(cfg, results, device)
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    size = trained["input_size"]
    transform = data.transforms(size, train=False)

    # 2. The new city cut as preprocessing cuts, refused when the cut differs from the model's.
    opts = rasters.options(cfg)
    new = newplace.cut_new(images, opts, cfg.patch.size, cfg.patch.stride, cfg.patch.max_nodata,
                           cfg.patch.jpeg_quality)
    for problem in new.problems:
        if cfg.strict:
            raise DataError(f"{problem} (strict=true; --set strict=false lists and skips it)")
        print(f"[similar] skipped: {problem}")
    if new.frame.empty:
        raise DataError(images, "no usable patch in these images (see above)", "fix the files listed or lower patch.size")
    known_sources = pd.read_csv(patches_dir / patches.SOURCES)
    differences = newplace.cut_differences(cities_training.patch_settings(cfg.paths.data), cfg, known_sources,
                                           pd.DataFrame(new.sources))
    if differences:
        runs.refuse(best_pt, f"was trained on images cut otherwise than those in {images}", differences,
                    "cut them alike: run with the config the model was trained with (its patches' settings are in "
                    f"{patches_dir / patches.STAMP}), or set patch.ground_m and train a model on patches of that ground size")

    # 3. Embeddings: the new patches, and the known cities' test patches.
    logits, emb, _ = embed(model, newplace.JpegPatches(new.jpegs, transform, size), cfg, device, "new patches")
    known = data.split_dataset(manifest, cfg.test.split, patches_dir, classes, transform, size)
    known_labels, cache = known.labels, results / "new" / newplace.KNOWN
    key = newplace.known_key(best_pt, cfg.test.split, known.files, device.type, cfg.train.amp)
    known_emb = newplace.read_known(cache, key)
    if known_emb is None:  # made once per model and split, shared by every new city
        _, known_emb, _ = embed(model, known, cfg, device, f"known {cfg.test.split} patches")
        newplace.write_known(cache, key, known_emb)

    # 4. Ranking of the known cities, with intervals over the new city's source images.
    folders = manifest.drop_duplicates("iata").set_index("iata")["city"]
    groups = new.frame["source"].to_numpy()
    pred = logits.argmax(axis=1)
    table = newplace.rank_cities(emb, pred, groups, known_emb, known_labels, classes,
                                 [folders[c] for c in classes], cfg.newplace.bootstrap, cfg.seed)
    write_csv(table, out / "similar_cities.csv")
    top = table.head(3)
    save_figure(figures.similar_cities_figure(table, f"{name}: which known city it looks like "
                                              f"({len(new.frame)} patches, {len(new.sources)} images)"),
                out / "similar_cities.png")

    # 5. Per patch: predicted city, nearest city by embedding; the nearest-patches panel.
    probs = softmax(logits, axis=1)
    near, near_sim = newplace.nearest_city(emb, known_emb, known_labels, len(classes))
    per_patch = new.frame.assign(predicted=[classes[i] for i in pred], probability=probs.max(axis=1),
                                 nearest_city=[classes[i] for i in near], nearest_similarity=near_sim)
    write_csv(per_patch, out / "patches.csv")
    geo = newplace.footprints(per_patch, new.georef)
    if geo is not None:
        with atomic_path(out / "patches.gpkg") as tmp:
            geo.to_file(tmp, layer="patches", driver="GPKG", engine="pyogrio")
            gis_style.style_gpkg(tmp, "patches", "nearest_similarity")
    top_idx = [classes.index(c) for c in top["iata"]]
    picks = newplace.pick_patches(groups, cfg.newplace.panel_patches, cfg.seed)
    nearest = newplace.nearest_patches(emb, picks, known_emb, known_labels, top_idx)
    save_figure(figures.nearest_patches_figure(
        [newplace.patch_image(new.jpegs[i]) for i in picks],
        [[data.read_image(known.files[k]).permute(1, 2, 0).numpy() for k in row] for row in nearest],
        list(top["iata"]), f"{name}: patches beside their nearest {cfg.test.split} patches"),
        out / "nearest_patches.png")
    sources = runs.fingerprint(images, newplace.find_images(images))
    runs.write_stamp(out / "similar_cities.stamp.json", "similar_cities.py", cfg, RUN_KEYS,
                     {**sources, **runs.fingerprint(results, [best_pt])})
    save_run_config(cfg, out, "similar_config.yaml")

    first = table.iloc[0]
    print(f"[similar] {name}: {len(new.frame)} patches of {len(new.sources)} images"
          + (f" ({new.left_out} blank left out)" if new.left_out else "")
          + "; most similar: " + ", ".join(f"{r.iata} {r.similarity:.3f} [{r.similarity_lo:.3f}, {r.similarity_hi:.3f}]"
                                            for r in top.itertuples())
          + f"; {first.share_predicted:.0%} of patches predicted {first.iata}, first in {first.first_share:.0%} "
          f"of resamples; results in {out}" + ("" if geo is None else " (patches.gpkg for QGIS)"))


if __name__ == "__main__":
    entry.run(main)
