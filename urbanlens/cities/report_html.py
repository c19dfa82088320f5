"""The city pipeline's ``report.html``: what ``<results>/cities`` holds, read from its files (metrics.json,
confusion_matrix.png, dendrogram_*.png, similar_pairs.csv, saliency/index.csv and panels,
new/<NAME>/similar_cities.csv), put together on one page by ``urbanlens.core.report_page``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core import report_page as rp

TIMING = ("seconds",)  # left out: the page stays the same for the same results, however long they took


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) and len(v) == 2 else (None, None)


def metrics_part(folder: Path) -> str:
    m = rp.read_json(folder / "metrics.json")
    if m is None:
        return rp.not_run("test metrics (metrics.json)", "test_classification.py")
    iv, perm = m.get("intervals", {}), m.get("permutation", {})
    rows = [("evaluated", f"{rp.esc(m.get('n_patches', '?'))} {rp.esc(m.get('split', 'test'))} patches; validation "
                          f"<code>{rp.esc(m.get('validation', '?'))}</code>; checkpoint epoch {rp.esc(m.get('checkpoint_epoch', '?'))}")]
    for key in ("accuracy", "macro_f1"):
        if key in m:
            rows.append((f"CNN {key}", rp.interval(m[key], *_pair(iv.get(key)))))
    if "top5_accuracy" in m:
        rows.append(("CNN top-5 accuracy", rp.num(m["top5_accuracy"])))
    b = m.get("baseline")
    if b:
        biv = b.get("intervals", {})
        rows.append(("baseline", rp.esc(b.get("name", "baseline")) + f", fitted on {rp.esc(b.get('train_patches', '?'))} "
                                                                    "training patches, same test patches"))
        for key in ("accuracy", "macro_f1"):
            if key in b:
                rows.append((f"baseline {key}", rp.interval(b[key], *_pair(biv.get(key)))))
    for key, g in m.get("gain_over_baseline", {}).items():
        rows.append((f"CNN gain over baseline, {key}", rp.interval(g.get("value"), g.get("lo"), g.get("hi"))))
    if "accuracy" in perm:
        rows.append(("permutation null, CNN accuracy", rp.p_value(perm["accuracy"])))
    if "baseline_accuracy" in perm:
        rows.append(("permutation null, baseline accuracy", rp.p_value(perm["baseline_accuracy"])))
    if iv:
        units = f"{rp.esc(iv.get('units_total', '?'))} {rp.esc(iv.get('unit', 'units'))}"
        rows.append(("intervals", f"{rp.num(iv.get('level', 0.95) * 100, 0)} % percentile bootstrap over {units} "
                                  f"({rp.esc(iv.get('resampled', ''))}), {rp.esc(iv.get('n_boot', '?'))} resamples"))
    if iv.get("note"):
        rows.append(("note", rp.flag(iv["note"])))
    body = rp.pairs(rows)
    recall = iv.get("per_city_recall", {})
    per_city = pd.DataFrame([{"city": c, "recall": v.get("recall"), "recall_interval": rp.interval(v.get("recall"), *_pair(recall.get(c))),
                              "precision": v.get("precision"), "f1": v.get("f1"), "support": v.get("support")}
                             for c, v in m.get("per_city", {}).items()])
    if not per_city.empty:
        body += "<h3>Per city (recall with its interval)</h3>" + rp.table(per_city.drop(columns="recall"))
    return body


def confusion_part(folder: Path) -> str:
    if not (folder / "confusion_matrix.png").is_file():
        return rp.not_run("confusion matrix", "test_classification.py")
    body = rp.image(folder / "confusion_matrix.png", "confusion matrix", 700)
    cm = rp.read_csv(folder / "confusion_matrix.csv")
    if cm is not None:
        body += "<h3>Counts (rows: true city, columns: predicted)</h3>" + rp.table(cm)
    return body


def similarity_part(folder: Path) -> str:
    figures = sorted(folder.glob("dendrogram_*.png"))
    if not figures:
        return rp.not_run("similarity dendrograms", "test_classification.py")
    body = "".join(rp.image(f, f.stem.replace("_", " "), 560) for f in figures)
    pairs = rp.read_csv(folder / "similar_pairs.csv")
    if pairs is not None:
        body += ("<h3>Most similar pairs per method</h3><p>stability: share of bootstrap resamples in which the "
                 "pair stays among the top pairs.</p>")
        body += rp.table(pairs.groupby("method", sort=False).head(5))
    return body


def saliency_part(folder: Path, per_city: int = 1) -> str:
    index = rp.read_csv(folder / "saliency" / "index.csv")
    if index is None:
        return rp.not_run("saliency panels", "saliency.py")
    body = ""
    if "maps_pass_sanity" in index.columns:
        passed = index["maps_pass_sanity"].astype(str).str.lower().eq("true")
        rho = index["sanity_randomisation_rho"].iloc[0] if "sanity_randomisation_rho" in index.columns else None
        body += ("<p>Sanity check (model randomisation): "
                 + (f"passed (rank correlation with a randomised model's maps {rp.num(rho)})" if passed.all() else
                    rp.flag(f"failed for {int((~passed).sum())} of {len(index)} panels: read these maps with care"))
                 + "</p>")
    shown = index.groupby("iata", sort=True).head(per_city)
    body += f"<p>{len(shown)} of {len(index)} panels, {per_city} per city (all in saliency/).</p>"
    for _, row in shown.iterrows():
        body += rp.image(folder / "saliency" / row["figure"],
                         f"saliency {row['iata']}: predicted {row.get('predicted', '?')}", 560)
    return body


def new_cities_part(folder: Path) -> str:
    tables = sorted((folder / "new").glob("*/similar_cities.csv"))
    if not tables:
        return rp.not_run("new places", "similar_cities.py --images FOLDER")
    body = ""
    for t in tables:
        body += f"<h3>{rp.esc(t.parent.name)}</h3>" + rp.table(pd.read_csv(t).head(10))
        body += rp.image(t.parent / "similar_cities.png", f"{t.parent.name}: similar cities", 700)
    return body


def training_part(folder: Path) -> str:
    log = rp.read_csv(folder / "train_log.csv")
    if log is None:
        return rp.not_run("training", "train_classification.py")
    log = log.drop(columns=[c for c in log.columns if c in TIMING])
    return f"<p>{len(log)} epochs logged (train_log.csv); the last ones:</p>" + rp.table(log.tail(5))


PARTS = (("metrics", "Test metrics, baseline and null", metrics_part),
         ("confusion", "Confusion matrix", confusion_part),
         ("similarity", "City similarity", similarity_part),
         ("saliency", "Saliency panels", saliency_part),
         ("new", "New places", new_cities_part),
         ("training", "Training", training_part))


def render(folder: Path) -> str:
    """The page of the city results folder ``folder`` (``<results>/cities``)."""
    return rp.pipeline_page("urbanlens: city identification", Path(folder), PARTS)
