"""Test the city classifier and measure how alike the cities look to it.

The best checkpoint (by validation accuracy) classifies the patches of cities.test.split (paper: test_b, a fixed
sample of 500 test patches per city). Writes under <results>/cities/: metrics.json (accuracy, top-5
accuracy when there are more than 5 cities, macro F1, per-city precision, recall and support, per-site
accuracy, number of patches), predictions.csv,
confusion_matrix.csv and .png (rows true, columns predicted, IATA codes, counts and row percentages),
and city similarity two ways (symmetrised row-normalised confusions; cosine similarity of the cities'
mean penultimate embeddings): similarity.csv, similar_pairs.csv, dendrogram_confusion.png and
dendrogram_embedding.png. The column layout of the similarity files is described in urbanlens/cities/similarity.py.
Every number carries a 95 % interval from a bootstrap over source images (urbanlens/cities/intervals.py;
metrics.json names the unit and its count per city, and says so when a city has fewer than 5), and
similar_pairs.csv a ``stability`` column: the share of resamples in which the pair is among the top k.
The accuracy gets a p-value against labels permuted among the test patches (``permutation``; p > 0.05:
not distinguishable from chance). With cities.test.baseline, the simple baseline of urbanlens/core/baseline.py,
fitted on the training patches, is scored on the same patches (``baseline``, baseline_predictions.csv),
and the CNN's gain over it gets an interval from the same resampled source images (``gain_over_baseline``).
metrics.json records the validation scheme the model was trained under (``validation``: cities.split.val);
MODEL_CARD.md is rewritten with these metrics.
"""
import os

# CPU threads sleep instead of spinning while they wait: on a shared or busy machine spinning threads
# slow training several-fold. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from urbanlens.cities import classifier, evaluation, patches, report, report_html
from urbanlens.core import entry
from urbanlens.core.config import data_dir
from urbanlens.core.files import save_run_config, write_csv
from urbanlens.core.stage import open_stage


def main() -> None:
    stage = open_stage(__doc__, "test_classification.py", "configs/cities_demo.yaml", ("cities",),
                       amp="cities.train.amp", channels_last="cities.train.channels_last", report=report_html.render)
    cfg, place, out = stage.cfg, stage.place, stage.out

    # 1. The model as trained: architecture, input size and class order come from the checkpoint.
    model, trained, classes, best_pt, epoch = classifier.trained_classifier(cfg, out, place)
    scheme = evaluation.validation_scheme(cfg, out, best_pt)

    # 2. Predictions on the test split, of the patches the model was trained with.
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    logits, embeddings, labels = evaluation.predict_split(model, cfg, manifest, patches_dir, classes,
                                                          trained["input_size"], place)
    pred = logits.argmax(axis=1)

    # 3. Accuracy and confusions, with 95 % intervals from a bootstrap over source images, and the
    # accuracy's p-value against labels permuted among these patches.
    rows = manifest[manifest["split"] == cfg.cities.test.split]
    metrics, permutation, boot = evaluation.model_scores(
        cfg, labels, logits, rows, classes,
        {"split": cfg.cities.test.split, "validation": scheme, "checkpoint": str(best_pt), "checkpoint_epoch": epoch})

    # 4. The simple baseline on the same patches: fitted on the training patches the model trained on.
    if cfg.cities.test.baseline:
        entries, permutation["baseline_accuracy"], base_lp = evaluation.baseline_scores(
            cfg, manifest, scheme, rows, patches_dir, classes, labels, pred, boot)
        metrics.update(entries)
        write_csv(evaluation.prediction_frame(rows, classes, labels, base_lp.argmax(axis=1),
                                              np.exp(base_lp).max(axis=1)), out / "baseline_predictions.csv")
    else:
        (out / "baseline_predictions.csv").unlink(missing_ok=True)  # not left from a run it does not belong to
    metrics["permutation"] = permutation
    confusions = evaluation.write_scores(out, metrics, rows, classes, labels, logits, cfg)

    # 5. City similarity, two ways, and its hierarchical clustering.
    pairs = evaluation.city_similarity(cfg, out, confusions, embeddings, labels, pred, rows["source"].to_numpy(),
                                       classes, metrics)
    save_run_config(cfg, out, "test_config.yaml")

    top3 = {m: ", ".join(p["city_a"].head(3) + "-" + p["city_b"].head(3)) for m, p in pairs.groupby("method", sort=False)}
    print(f"[test] {metrics['n_patches']} {cfg.cities.test.split} patches, validation {scheme}: "
          + (f"top-5 {metrics['top5_accuracy']:.3f}, " if "top5_accuracy" in metrics else "")
          + f"macro F1 {metrics['macro_f1']:.3f}; most similar: "
          + "; ".join(f"{m} {t}" for m, t in top3.items()) + f"; results in {out}")
    print(f"[test] {report.headline(metrics)}")


if __name__ == "__main__":
    entry.run(main)
