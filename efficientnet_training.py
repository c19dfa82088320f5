"""Per-city income-quintile model from aerial cell images, with random, spatial or leave-one-city-out folds.

For each city of the config, its non-void census cells are labelled with the city's income quintiles
(0 = poorest fifth, 4 = richest). EfficientNet-B0 reads a min-max-scaled cell image and outputs one
sigmoid unit p, read as a binomial over the five ordered classes, trained with categorical cross-entropy.
Folds by ses.train.cv: stratified (random cells, the paper's), spatial (whole blocks of block_m metres,
training cells within buffer_m of a test cell dropped) or city (each city tested by a model trained on
the others). In each fold a share of the training cells validates: Adam, reduce-on-plateau
and early stopping on the validation loss, restarted from the best weights at lr / 2^restart. The
held-out fold is predicted and scored; a cross-fold summary names the best fold (lowest val loss).
A simple baseline (colour/texture statistics and random convolutional features, ses.baseline) is fitted
and scored on the same folds; metrics.json gives both with intervals from a bootstrap of spatial blocks
(ses.train.bootstrap), the CNN's gain over the baseline and a permutation p-value of each AUC;
MODEL_CARD.md beside them says what the models were trained on, those numbers and where not to use them.
Each city's split is saved as folds.csv. Every epoch saves the fold's training state to fold_<k>/last.pt
(removed when the fold is done): a re-run of the same command skips finished folds and continues an
interrupted one from its last epoch, ending where an uninterrupted run ends.
With ses.train.freeze=backbone only the sigmoid unit (after dropout) learns, on the cells' pooled features
computed once and cached in <results>/ses/embeddings/ (urbanlens/ses/frozen.py); the folds are trained,
scored and saved as above.

    python efficientnet_training.py --config configs/ses_demo.yaml [--set ses.train.epochs=5]
    torchrun --nproc_per_node=N efficientnet_training.py ...   (data-parallel over N GPUs;
                                                               ses.train.batch_size is the global batch;
                                                               batch norm synchronised: without dropout and
                                                               stochastic depth, the one-process model)
"""
from urbanlens.core import entry
from urbanlens.core.errors import DataError
from urbanlens.core.stage import open_stage
from urbanlens.ses import data as ses_data
from urbanlens.ses import model as ses_model
from urbanlens.ses import report_html
from urbanlens.ses import training


def main() -> None:
    stage = open_stage(__doc__, "efficientnet_training.py", "configs/ses_demo.yaml", ("ses",),
                       amp="ses.train.amp", channels_last=True, report=report_html.render)  # NHWC on CUDA, CPU bf16
    cfg, place, ses_dir = stage.cfg, stage.place, stage.out  # the lock is shared by the ranks of one torchrun
    training.check_scheme(cfg, place)
    cells = ses_data.read_cells(ses_dir / "cells.gpkg")
    ses_model.build_ses_model(cfg)  # fail now, not after a city, when ImageNet weights are asked for but absent

    # 1. each city's non-void cells and its own income quintiles (a city without usable cells is skipped)
    prepared, skipped = training.usable_cities(cfg, cells, ses_dir, place)
    # 2. every city's training cells and folds under the fold scheme, before any training
    fits, datasets, rows = training.city_fits(cfg, prepared, ses_dir), {}, []
    for fit in fits:
        # 3. finished folds are reused only when they were trained with this config (or overwrite=true)
        retrain = training.start_city(cfg, fit, ses_dir, place)
        if fit.name not in datasets:  # a pool of every city's cells is read once for all of them
            datasets[fit.name] = training.cell_data(cfg, fit, ses_dir, place)
        # 4. each fold: train with early stopping and restarts, keep the best weights, score held-out cells
        training.train_folds(cfg, fit, datasets[fit.name], retrain, ses_dir, place)
        # 5. the simple baseline on the same folds, then the cross-fold summary beside it
        if place.main:
            rows.append(training.summarise_city(cfg, fit, ses_dir))

    if skipped and len(skipped) == len(cfg.ses.cities):
        raise DataError(ses_dir / "cells.gpkg", f"no city has usable cells: {'; '.join(skipped)}",
                        "check ses.cities, ses.max_nodata and the orthophotos, and re-run generate_fr_ua_aerial_data.py")
    if place.main and rows:
        training.write_summary(rows, skipped, ses_dir)


if __name__ == "__main__":
    entry.run(main)
