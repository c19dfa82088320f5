"""Saliency maps: what in a patch makes its city recognisable to the classifier?

For cities.saliency.per_city random patches (seeded) of every city in split cities.saliency.split, the best city
classifier's class-activation map for the patch's true city, on the last residual block (paper:
Relevance-CAM; cities.saliency.method: gradcam | gradcampp | relevancecam). Each patch gets a figure
original | heat-map overlay | patch masked where the normalised map exceeds cities.saliency.threshold, written as
<results>/cities/saliency/<IATA>/<patch stem>.png, and a row of <results>/cities/saliency/index.csv.
Every row also carries the sanity check of the maps over cities.saliency.sanity_patches seeded patches of the
sample (0 = off; urbanlens.core.sanity): model randomisation (median Spearman rho between the trained and
a randomly initialised model's maps) and deletion against random pixel orders, in the columns
sanity_maps, sanity_randomisation_rho, sanity_deletion_gain, sanity_insertion_gain, sanity_deletion_p and
maps_pass_sanity (empty when the check is off).
"""
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from urbanlens.cities import classifier, data, patches, report_html
from urbanlens.cities.figures import saliency_figure
from urbanlens.cities.saliency import sample_patches, sanity_check
from urbanlens.core import entry, sanity, schema
from urbanlens.core.backbones import last_conv_layer
from urbanlens.core.cam import check_method, class_activation_maps, feature_grid
from urbanlens.core.config import data_dir
from urbanlens.core.errors import DataError
from urbanlens.core.files import save_figure, save_run_config, write_csv
from urbanlens.core.stage import open_stage


def main() -> None:
    stage = open_stage(__doc__, "saliency.py", "configs/cities_demo.yaml", ("cities", "saliency"), lock=("cities",),
                       report=report_html.render)
    cfg, out, device = stage.cfg, stage.out, stage.place.device  # float32 maps

    # The model as trained (architecture, input size and class order (IATA codes) from the checkpoint),
    # on the patches it was trained with.
    model, trained, classes, _, _ = classifier.trained_classifier(cfg, out.parent, stage.place)
    model = model.eval()
    layer = last_conv_layer(model)
    check_method(model, cfg.cities.saliency.method)  # e.g. Relevance-CAM where no canonizer fits: now, not later
    preprocess = data.transforms(trained["input_size"], train=False)
    coarse = schema.cam_map_problem("cities.model.input_size", trained["input_size"], "cities.patch.size",
                                    feature_grid(model, layer, trained["input_size"]))
    if coarse:  # the model is trained: say so, and explain what it can
        print(f"[saliency] warning: {coarse} (and retrain)", file=sys.stderr)

    # The patches to explain: cities.saliency.per_city random ones per city, target = the patch's true city.
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    chosen = sample_patches(manifest, cfg.cities.saliency.split, cfg.cities.saliency.per_city, cfg.seed)
    if chosen.empty:
        raise DataError(f"{patches_dir / 'manifest.csv'}: no patches in split '{cfg.cities.saliency.split}'; "
                         f"re-run preprocessing.py or pass --set cities.saliency.split=<one of "
                         f"{', '.join(sorted(manifest['split'].unique()))}>")
    unknown = sorted(set(chosen["iata"]) - set(classes))
    if unknown:
        raise DataError(f"{patches_dir / 'manifest.csv'}: cities {', '.join(unknown)} are not among the "
                         f"model's classes; re-run train_classification.py on these patches")

    rows = []
    bs = cfg.cities.saliency.batch_size
    bar = tqdm(total=len(chosen), desc=f"saliency ({cfg.cities.saliency.method})", unit="patch")
    for start in range(0, len(chosen), bs):
        batch = chosen.iloc[start:start + bs]
        files = [patches_dir / f for f in batch["path"]]
        pixels = [data.read_image(f) for f in files]  # full resolution, for the figure
        x = torch.stack([preprocess(data.read_image(f, trained["input_size"])) for f in files]).to(device)  # as in training
        targets = [classes.index(c) for c in batch["iata"]]
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1).cpu().numpy()
        maps = class_activation_maps(model, layer, x, targets, cfg.cities.saliency.method)
        for (_, row), image, cam, p in zip(batch.iterrows(), pixels, maps, probs):
            predicted = classes[int(p.argmax())]
            figure = out / row["iata"] / f"{Path(row['path']).stem}.png"
            title = f"true {row['iata']}, predicted {predicted} ({p.max():.0%}); {cfg.cities.saliency.method}"
            save_figure(saliency_figure(image.permute(1, 2, 0).numpy(), cam, cfg.cities.saliency.threshold, title), figure)
            rows.append({"iata": row["iata"], "path": row["path"], "predicted": predicted,
                         "p_true": float(p[classes.index(row["iata"])]), "figure": str(figure.relative_to(out))})
        bar.update(len(batch))
    bar.close()

    # whether the maps depend on what the model learned and point at what drives its score
    verdict, checked = None, chosen.iloc[sanity.sample(len(chosen), cfg.cities.saliency.sanity_patches, cfg.seed)]
    if cfg.cities.saliency.sanity_patches:
        batches = ((torch.stack([preprocess(data.read_image(patches_dir / f, trained["input_size"])) for f in b["path"]]
                                ).to(device), [classes.index(c) for c in b["iata"]])
                   for b in (checked.iloc[i:i + bs] for i in range(0, len(checked), bs)))
        verdict = sanity.summarise(*sanity_check(model, layer, batches, cfg.cities.saliency.method, cfg.seed))

    index = sanity.annotate(pd.DataFrame(rows), verdict)
    write_csv(index, out / "index.csv")
    save_run_config(cfg, out)
    # panels of an earlier sample (another seed, split or per_city) would be taken for this one's
    kept = {out / f for f in index["figure"]}
    stale = [p for p in out.glob("*/*.png") if p not in kept]
    for p in stale:
        p.unlink()
    print(f"[saliency] {len(index)} {cfg.cities.saliency.method} panels for {index['iata'].nunique()} cities "
          f"({cfg.cities.saliency.split} split, {(index['predicted'] == index['iata']).mean():.0%} correctly classified) "
          f"in {out}" + (f"; {len(stale)} panels of an earlier sample removed" if stale else "")
          + (f"; sanity over {verdict.maps} patches: median rho vs a random model {verdict.rho:.2f}, deletion gain "
             f"{verdict.deletion_gain:+.3f} (p = {verdict.deletion_p:.2g}), "
             + ("maps pass" if verdict.passes else f"maps FAIL: {verdict.reason}") if verdict is not None else ""))


if __name__ == "__main__":
    entry.run(main)
