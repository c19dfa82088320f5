"""Test the city classifier and measure how alike the cities look to it.

The best checkpoint (by validation accuracy) classifies the patches of test.split (paper: test_b, a fixed
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
not distinguishable from chance). With test.baseline, the simple baseline of urbanlens/core/baseline.py,
fitted on the training patches, is scored on the same patches (``baseline``, baseline_predictions.csv),
and the CNN's gain over it gets an interval from the same resampled source images (``gain_over_baseline``).
metrics.json records the validation scheme the model was trained under (``validation``: split.val);
MODEL_CARD.md is rewritten with these metrics.
"""
import os

# CPU threads sleep instead of spinning while they wait: on a shared or busy machine spinning threads
# slow training several-fold. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
from scipy.special import softmax

from urbanlens.cities import baseline as cities_baseline
from urbanlens.cities import data, figures, intervals, null, patches, report, similarity, validation
from urbanlens.cities import metrics as cities_metrics
from urbanlens.cities import training as cities_training
from urbanlens.core import entry, locks, loops, model_card, runtime
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.errors import ConfigError
from urbanlens.core.files import save_figure, save_run_config, write_csv, write_json


def main() -> None:
    cfg, _ = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml")
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    out = results_dir(cfg, "cities")
    entry.keep(locks.hold(out, "test_classification.py", cfg))

    # The model as trained: architecture, input size and class order come from the checkpoint.
    model, trained, classes, best_pt, epoch = cities_training.trained_classifier(cfg, out, device)
    scheme = cities_training.trained_validation(out) or cfg.split.val
    if scheme != cfg.split.val:
        raise ConfigError(f"{best_pt}: trained with split.val={scheme}, the config says split.val={cfg.split.val}; "
                          f"test with --set split.val={scheme}, or train again under split.val={cfg.split.val}")

    # Predictions on the test split, of the patches the model was trained with.
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    size = trained["input_size"]
    test_set = data.split_dataset(manifest, cfg.test.split, patches_dir, classes,
                                      data.transforms(size, train=False), size)
    loader = loops.make_loader(test_set, cfg.test.batch_size, cfg.workers, device)
    logits, embeddings, labels = loops.predict(model, loader, device, cfg.train.amp, cfg.train.channels_last,
                                               embeddings=True)
    pred = logits.argmax(axis=1)

    # Accuracy and confusions, with 95 % intervals from a bootstrap over source images, and the
    # accuracy's p-value against labels permuted among these patches.
    rows = manifest[manifest["split"] == cfg.test.split]
    sources = rows["source"].to_numpy()
    n_boot, n_perm = cfg.test.bootstrap, cfg.test.permutations
    boot = intervals.bootstrap_scores(labels, pred, sources, classes, n_boot, cfg.seed)
    metrics = cities_metrics.classification_metrics(labels, logits, classes)
    metrics["per_site"] = cities_metrics.per_site_accuracy(labels, pred, rows["iata"], rows["site"])
    metrics.update(split=cfg.test.split, validation=scheme, checkpoint=str(best_pt), checkpoint_epoch=epoch,
                   intervals=intervals.metric_intervals(labels, pred, sources, classes, n_boot, cfg.seed, scores=boot))
    permutation = {"permutations": n_perm, "accuracy": null.accuracy_p_value(labels, pred, n_perm, cfg.seed)}

    # The simple baseline on the same patches: fitted on the training patches the model trained on.
    if cfg.test.baseline:
        train_rows = validation.training_splits(manifest, scheme)
        base_lp, fitted = cities_baseline.fit_score(train_rows[train_rows["split"] == "train"], rows, patches_dir,
                                                    classes, cfg.test.baseline_max_train, cfg.seed)
        base_pred = base_lp.argmax(axis=1)
        base = cities_metrics.classification_metrics(labels, base_lp, classes)
        base_boot = intervals.bootstrap_scores(labels, base_pred, sources, classes, n_boot, cfg.seed)  # same resamples
        metrics["baseline"] = {"name": fitted["name"], "accuracy": base["accuracy"], "macro_f1": base["macro_f1"],
                               "train_patches": fitted["train_patches"], "seconds": fitted["seconds"],
                               "intervals": intervals.metric_intervals(labels, base_pred, sources, classes, n_boot,
                                                                       cfg.seed, scores=base_boot)}
        metrics["gain_over_baseline"] = intervals.paired_gain(labels, pred, base_pred, sources, classes, n_boot,
                                                              cfg.seed, scores=boot, scores_ref=base_boot)
        permutation["baseline_accuracy"] = null.accuracy_p_value(labels, base_pred, n_perm, cfg.seed)
        write_csv(prediction_frame(rows, classes, labels, base_pred, np.exp(base_lp).max(axis=1)),
                  out / "baseline_predictions.csv")
    else:
        (out / "baseline_predictions.csv").unlink(missing_ok=True)  # not left from a run it does not belong to
    metrics["permutation"] = permutation
    confusions = cities_metrics.confusion_frame(labels, pred, classes)
    lo, hi = metrics["intervals"]["accuracy"]
    write_json(out / "metrics.json", metrics)
    model_card.write_cities_card(out, cfg, cities_training.STAMP, metrics)
    write_csv(prediction_frame(rows, classes, labels, pred, softmax(logits, axis=1).max(axis=1)), out / "predictions.csv")
    write_csv(confusions, out / "confusion_matrix.csv", index=True)
    save_figure(figures.confusion_matrix_figure(confusions.to_numpy(), classes, title=report.with_note(
        f"{cfg.test.split}: accuracy {metrics['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%})", metrics)),
        out / "confusion_matrix.png")

    # City similarity, two ways, and its hierarchical clustering.
    matrices = {"confusion": similarity.confusion_similarity(confusions.to_numpy()),
                "embedding": similarity.embedding_similarity(embeddings, labels, len(classes))}
    pairs = pd.concat([similarity.similar_pairs(s, classes, m) for m, s in matrices.items()], ignore_index=True)
    top_k = cfg.test.stability_top_k or max(1, len(classes) // 2)
    pairs = intervals.with_stability(pairs, intervals.pair_stability(labels, pred, embeddings, sources, classes, top_k,
                                                                     cfg.test.bootstrap, cfg.seed))
    write_csv(similarity.similarity_table(matrices, classes), out / "similarity.csv")
    write_csv(pairs, out / "similar_pairs.csv")
    for method, sim in matrices.items():
        save_figure(figures.dendrogram_figure(similarity.cluster(sim), classes,
                                              title=report.with_note(f"cities by {method} similarity", metrics)),
                    out / f"dendrogram_{method}.png")
    save_run_config(cfg, out, "test_config.yaml")

    top3 = {m: ", ".join(p["city_a"].head(3) + "-" + p["city_b"].head(3)) for m, p in pairs.groupby("method", sort=False)}
    print(f"[test] {metrics['n_patches']} {cfg.test.split} patches, validation {scheme}: "
          + (f"top-5 {metrics['top5_accuracy']:.3f}, " if "top5_accuracy" in metrics else "")
          + f"macro F1 {metrics['macro_f1']:.3f}; most similar: "
          + "; ".join(f"{m} {t}" for m, t in top3.items()) + f"; results in {out}")
    print(f"[test] {report.headline(metrics)}")


def prediction_frame(rows: pd.DataFrame, classes, labels, pred, confidence) -> pd.DataFrame:
    """One row per evaluated patch: path, true and predicted city, the predicted city's probability."""
    return pd.DataFrame({"path": rows["path"].to_numpy(), "true": [classes[i] for i in labels],
                         "predicted": [classes[i] for i in pred], "confidence": confidence})


if __name__ == "__main__":
    entry.run(main)
