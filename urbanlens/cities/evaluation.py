"""The test stage's steps (test_classification.py): the trained model's predictions on the test split,
their scores with intervals over source images and a permutation p-value, the simple baseline on the same
patches, and the written tables and figures (metrics.json, predictions, confusions, city similarity)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax

from ..core import loops, model_card
from ..core.errors import ConfigError
from ..core.files import save_figure, write_csv, write_json
from . import baseline as cities_baseline
from . import data, figures, intervals, null, report, similarity, training, validation
from . import metrics as cities_metrics


def validation_scheme(cfg, results: Path, best_pt: Path) -> str:
    """The cities.split.val the model was trained under; refused when the config names another."""
    scheme = training.trained_validation(results) or cfg.cities.split.val
    if scheme != cfg.cities.split.val:
        raise ConfigError(f"{best_pt}: trained with cities.split.val={scheme}, the config says cities.split.val={cfg.cities.split.val}; "
                          f"test with --set cities.split.val={scheme}, or train again under cities.split.val={cfg.cities.split.val}")
    return scheme


def predict_split(model, cfg, manifest: pd.DataFrame, patches_dir: Path, classes, size: int, place):
    """Logits, penultimate embeddings and labels of the patches of cities.test.split, in manifest order."""
    test_set = data.split_dataset(manifest, cfg.cities.test.split, patches_dir, classes,
                                  data.transforms(size, train=False), size)
    loader = loops.make_loader(test_set, cfg.cities.test.batch_size, cfg.workers, place.device)
    return loops.predict(model, loader, place, embeddings=True)


def model_scores(cfg, labels, logits, rows: pd.DataFrame, classes, record: dict) -> tuple[dict, dict, dict]:
    """metrics.json's scores (``record``: split, validation and checkpoint entries placed before the
    intervals), the accuracy's permutation p-value and the bootstrap resamples over source images."""
    pred, sources = logits.argmax(axis=1), rows["source"].to_numpy()
    n_boot = cfg.cities.test.bootstrap
    boot = intervals.bootstrap_scores(labels, pred, sources, classes, n_boot, cfg.seed)
    metrics = cities_metrics.classification_metrics(labels, logits, classes)
    metrics["per_site"] = cities_metrics.per_site_accuracy(labels, pred, rows["iata"], rows["site"])
    metrics.update(**record, intervals=intervals.metric_intervals(labels, pred, sources, classes, n_boot, cfg.seed,
                                                                  scores=boot))
    permutation = {"permutations": cfg.cities.test.permutations,
                   "accuracy": null.accuracy_p_value(labels, pred, cfg.cities.test.permutations, cfg.seed)}
    return metrics, permutation, boot


def baseline_scores(cfg, manifest: pd.DataFrame, scheme: str, rows: pd.DataFrame, patches_dir: Path, classes,
                    labels, pred, boot: dict) -> tuple[dict, float, np.ndarray]:
    """The simple baseline fitted on the training patches the model trained on, scored on the same test
    patches: its metrics.json entries (``baseline``, ``gain_over_baseline`` over the same resamples), its
    accuracy's permutation p-value and its log-probabilities."""
    sources, n_boot = rows["source"].to_numpy(), cfg.cities.test.bootstrap
    train_rows = validation.training_splits(manifest, scheme)
    base_lp, fitted = cities_baseline.fit_score(train_rows[train_rows["split"] == "train"], rows, patches_dir,
                                                classes, cfg.cities.test.baseline_max_train, cfg.seed)
    base_pred = base_lp.argmax(axis=1)
    base = cities_metrics.classification_metrics(labels, base_lp, classes)
    base_boot = intervals.bootstrap_scores(labels, base_pred, sources, classes, n_boot, cfg.seed)  # same resamples
    entries = {"baseline": {"name": fitted["name"], "accuracy": base["accuracy"], "macro_f1": base["macro_f1"],
                            "train_patches": fitted["train_patches"], "seconds": fitted["seconds"],
                            "intervals": intervals.metric_intervals(labels, base_pred, sources, classes, n_boot,
                                                                    cfg.seed, scores=base_boot)},
               "gain_over_baseline": intervals.paired_gain(labels, pred, base_pred, sources, classes, n_boot,
                                                           cfg.seed, scores=boot, scores_ref=base_boot)}
    return entries, null.accuracy_p_value(labels, base_pred, cfg.cities.test.permutations, cfg.seed), base_lp


def prediction_frame(rows: pd.DataFrame, classes, labels, pred, confidence) -> pd.DataFrame:
    """One row per evaluated patch: path, true and predicted city, the predicted city's probability."""
    return pd.DataFrame({"path": rows["path"].to_numpy(), "true": [classes[i] for i in labels],
                         "predicted": [classes[i] for i in pred], "confidence": confidence})


def write_scores(out: Path, metrics: dict, rows: pd.DataFrame, classes, labels, logits, cfg) -> pd.DataFrame:
    """metrics.json, MODEL_CARD.md with these metrics, predictions.csv and the confusion matrix (.csv and
    .png) of the split ``cities.test.split``; returns the confusions."""
    split = cfg.cities.test.split
    pred = logits.argmax(axis=1)
    confusions = cities_metrics.confusion_frame(labels, pred, classes)
    lo, hi = metrics["intervals"]["accuracy"]
    write_json(out / "metrics.json", metrics)
    model_card.write_cities_card(out, cfg, training.STAMP, metrics)
    write_csv(prediction_frame(rows, classes, labels, pred, softmax(logits, axis=1).max(axis=1)), out / "predictions.csv")
    write_csv(confusions, out / "confusion_matrix.csv", index=True)
    save_figure(figures.confusion_matrix_figure(confusions.to_numpy(), classes, title=report.with_note(
        f"{split}: accuracy {metrics['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%})", metrics)),
        out / "confusion_matrix.png")
    return confusions


def city_similarity(cfg, out: Path, confusions: pd.DataFrame, embeddings, labels, pred, sources, classes,
                    metrics: dict) -> pd.DataFrame:
    """City similarity two ways (confusions, embeddings) with each pair's stability over the resamples,
    and its hierarchical clustering: similarity.csv, similar_pairs.csv, dendrogram_<method>.png."""
    matrices = {"confusion": similarity.confusion_similarity(confusions.to_numpy()),
                "embedding": similarity.embedding_similarity(embeddings, labels, len(classes))}
    pairs = pd.concat([similarity.similar_pairs(s, classes, m) for m, s in matrices.items()], ignore_index=True)
    top_k = cfg.cities.test.stability_top_k or max(1, len(classes) // 2)
    pairs = intervals.with_stability(pairs, intervals.pair_stability(labels, pred, embeddings, sources, classes, top_k,
                                                                     cfg.cities.test.bootstrap, cfg.seed))
    write_csv(similarity.similarity_table(matrices, classes), out / "similarity.csv")
    write_csv(pairs, out / "similar_pairs.csv")
    for method, sim in matrices.items():
        save_figure(figures.dendrogram_figure(similarity.cluster(sim), classes,
                                              title=report.with_note(f"cities by {method} similarity", metrics)),
                    out / f"dendrogram_{method}.png")
    return pairs
