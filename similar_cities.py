"""Which known cities does a new city look like? A trained city classifier asked about a place it never saw.

The new city's images (--images DIR: any layout of image files, or the raw layout of one city,
<site>/<image>) are cut as preprocessing.py cuts the known cities' (same reader, bands, scaling, ground
size, patch size and stride, blank-patch rule, JPEG quality; settings from the config, which must match
those the model's patches were cut with: a model trained on other bands or another ground size is
refused, naming the difference). The classifier (<results>/cities/checkpoints/best.pt) embeds every
patch and the known cities' test patches (cities.test.split). Writes <results>/cities/new/<NAME>/:
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

from urbanlens.cities import classifier, data, figures, newplace, patches, report_html, similar
from urbanlens.core import entry, runs
from urbanlens.core.config import data_dir, results_dir
from urbanlens.core.files import save_figure, save_run_config, write_csv
from urbanlens.core.stage import open_stage


def options(parser):
    parser.add_argument("--images", required=True, help="folder of the new city's images (any layout)")
    parser.add_argument("--name", help="name of the new city (default: the folder's name)")


def main() -> None:
    stage = open_stage(__doc__, "similar_cities.py", "configs/cities_demo.yaml", similar.new_city, options,
                       amp="cities.train.amp", channels_last="cities.train.channels_last", report=report_html.render)
    cfg, args, place, out = stage.cfg, stage.args, stage.place, stage.out
    images, name, results = Path(args.images), out.name, results_dir(cfg, "cities")

    # 1. The model as trained, and the known cities' test patches it was trained beside.
    model, trained, classes, best_pt, _ = classifier.trained_classifier(cfg, results, place)
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    size = trained["input_size"]
    transform = data.transforms(size, train=False)

    # 2. The new city cut as preprocessing cuts, refused when the cut differs from the model's.
    new = similar.cut_like_the_model(cfg, images, patches_dir, best_pt)

    # 3. Embeddings: the new patches, and the known cities' test patches.
    logits, emb, _ = similar.embed(model, newplace.JpegPatches(new.jpegs, transform, size), cfg, place, "new patches")
    known = data.split_dataset(manifest, cfg.cities.test.split, patches_dir, classes, transform, size)
    known_emb = similar.known_embeddings(model, cfg, known, results / "new" / newplace.KNOWN, best_pt, place)

    # 4. Ranking of the known cities, with intervals over the new city's source images.
    folders = manifest.drop_duplicates("iata").set_index("iata")["city"]
    table = newplace.rank_cities(emb, logits.argmax(axis=1), new.frame["source"].to_numpy(), known_emb, known.labels,
                                 classes, [folders[c] for c in classes], cfg.cities.newplace.bootstrap, cfg.seed)
    write_csv(table, out / "similar_cities.csv")
    top = table.head(3)
    save_figure(figures.similar_cities_figure(table, f"{name}: which known city it looks like "
                                              f"({len(new.frame)} patches, {len(new.sources)} images)"),
                out / "similar_cities.png")

    # 5. Per patch: predicted city, nearest city by embedding; the nearest-patches panel.
    geo = similar.write_patches(out, new, logits, emb, known_emb, known.labels, classes)
    similar.nearest_panel(out / "nearest_patches.png", new, emb, known, known_emb, list(top["iata"]), classes, cfg, name)
    sources = runs.fingerprint(images, newplace.find_images(images))
    runs.write_stamp(out / "similar_cities.stamp.json", "similar_cities.py", cfg, similar.RUN_KEYS,
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
