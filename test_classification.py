"""Test the city classifier and measure how alike the cities look to it.

The best checkpoint (by validation accuracy) classifies the patches of test.split (paper: test_b, a fixed
sample of 500 test patches per city). Writes under <results>/cities/: metrics.json (accuracy, top-5
accuracy when there are more than 5 cities, macro F1, per-city precision, recall and support, per-site
accuracy, number of patches), predictions.csv,
confusion_matrix.csv and .png (rows true, columns predicted, IATA codes, counts and row percentages),
and city similarity two ways (symmetrised row-normalised confusions; cosine similarity of the cities'
mean penultimate embeddings): similarity.csv, similar_pairs.csv, dendrogram_confusion.png and
dendrogram_embedding.png. The column layout of the similarity files is described in urbanlens/cities/similarity.py.
Every number carries a 95 % interval from a bootstrap over source images (urbanlens/cities/intervals.py), and
similar_pairs.csv a ``stability`` column: the share of resamples in which the pair is among the top k.
"""
import os

# CPU threads sleep instead of spinning while they wait: on a shared or busy machine spinning threads
# slow training several-fold. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd
from scipy.special import softmax

from urbanlens.cities import data, figures, intervals, patches, similarity
from urbanlens.cities import metrics as cities_metrics
from urbanlens.cities import training as cities_training
from urbanlens.core import entry, locks, loops, runtime
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.files import save_figure, save_run_config, write_csv, write_json


def main() -> None:
    cfg, _ = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml")
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    out = results_dir(cfg, "cities")
    entry.keep(locks.hold(out, "test_classification.py", cfg))

    # The model as trained: architecture, input size and class order come from the checkpoint.
    model, trained, classes, best_pt, epoch = cities_training.trained_classifier(cfg, out, device)

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

    # Accuracy and confusions, with 95 % intervals from a bootstrap over source images.
    rows = manifest[manifest["split"] == cfg.test.split]
    sources = rows["source"].to_numpy()
    metrics = cities_metrics.classification_metrics(labels, logits, classes)
    metrics["per_site"] = cities_metrics.per_site_accuracy(labels, pred, rows["iata"], rows["site"])
    metrics.update(split=cfg.test.split, checkpoint=str(best_pt), checkpoint_epoch=epoch,
                   intervals=intervals.metric_intervals(labels, pred, sources, classes, cfg.test.bootstrap, cfg.seed))
    confusions = cities_metrics.confusion_frame(labels, pred, classes)
    lo, hi = metrics["intervals"]["accuracy"]
    write_json(out / "metrics.json", metrics)
    write_csv(pd.DataFrame({"path": manifest.loc[manifest["split"] == cfg.test.split, "path"].to_numpy(),
                            "true": [classes[i] for i in labels], "predicted": [classes[i] for i in pred],
                            "confidence": softmax(logits, axis=1).max(axis=1)}), out / "predictions.csv")
    write_csv(confusions, out / "confusion_matrix.csv", index=True)
    save_figure(figures.confusion_matrix_figure(
        confusions.to_numpy(), classes, title=f"{cfg.test.split}: accuracy {metrics['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%})"),
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
        save_figure(figures.dendrogram_figure(similarity.cluster(sim), classes, title=f"cities by {method} similarity"),
                    out / f"dendrogram_{method}.png")
    save_run_config(cfg, out, "test_config.yaml")

    top3 = {m: ", ".join(p["city_a"].head(3) + "-" + p["city_b"].head(3)) for m, p in pairs.groupby("method", sort=False)}
    print(f"[test] {metrics['n_patches']} {cfg.test.split} patches: accuracy {metrics['accuracy']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f} over source images), "
          + (f"top-5 {metrics['top5_accuracy']:.3f}, " if "top5_accuracy" in metrics else "")
          + f"macro F1 {metrics['macro_f1']:.3f}; most similar: "
          + "; ".join(f"{m} {t}" for m, t in top3.items()) + f"; results in {out}")


if __name__ == "__main__":
    entry.run(main)
