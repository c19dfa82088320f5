"""The SES pipeline's ``report.html``: what ``<results>/ses`` holds, read from its files (extract_counts.json,
<City>/metrics.json, landuse_summary.csv pooled and per city, <City>/predicted/agreement.json, the
figures) with the interactive map of each city's cells (``urbanlens.ses.report_map``), put together on
one page by ``urbanlens.core.report_page``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..core import report_page as rp
from . import report_map

METRICS = ("auc_poor_rich", "kappa_quadratic", "spearman")
LANDUSE_COLUMNS = ("ua_class", "pieces", "rich_minus_poor", "rich_score_mean", "rich_score_lo", "rich_score_hi",
                   "poor_score_mean", "poor_score_lo", "poor_score_hi", "meaningful", "caveat", "maps_pass_sanity")


def cities(folder: Path) -> list[str]:
    """The cities with a results folder of their own, in name order."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and ((p / "metrics.json").is_file() or
                                                                   (p / "predicted").is_dir() or (p / "cams").is_dir())) \
        if folder.is_dir() else []


def extraction_part(folder: Path) -> str:
    counts = rp.read_json(folder / "extract_counts.json")
    if counts is None and not (folder / "cells.gpkg").is_file():
        return rp.not_run("cell images and census incomes", "generate_fr_ua_aerial_data.py")
    body = "<p>cells.gpkg holds the extracted 200 m cells with their census income.</p>"
    if counts:
        body += "<h3>Rows left out while reading the census (extract_counts.json)</h3>"
        body += rp.table(pd.DataFrame(counts).T.rename_axis("city").reset_index())
    return body


def _bootstrap_row(label: str, block: dict, pooled: dict) -> dict:
    boot = block.get("bootstrap", {})
    row = {"": label}
    for key in METRICS:
        b = boot.get(key, {})
        row[key] = rp.interval(b.get("value", pooled.get(key)), b.get("lo"), b.get("hi"))
    return row


def city_metrics(folder: Path, city: str) -> str:
    m = rp.read_json(folder / city / "metrics.json")
    if m is None:
        return rp.not_run(f"{city}: training metrics", "efficientnet_training.py")
    iv = m.get("intervals", {})
    rows = [_bootstrap_row("CNN (pooled out-of-fold)", iv, m.get("pooled", {}))]
    b = m.get("baseline")
    if b:
        rows.append(_bootstrap_row("baseline", b.get("intervals", {}), b.get("pooled", {})))
    gain = m.get("gain_over_baseline", {})
    if gain:
        rows.append({"": "CNN gain over baseline", **{k: rp.interval(gain[k].get("value"), gain[k].get("lo"), gain[k].get("hi"))
                                                      for k in METRICS if k in gain}})
    perm = m.get("permutation", {})
    text = (f"<p>{rp.esc(m.get('n_cells', '?'))} cells, cross-validation <code>{rp.esc(m.get('cv', '?'))}</code> with "
            f"{rp.esc(m.get('folds', '?'))} folds; {rp.num(iv.get('level', 0.95) * 100, 0)} % intervals: bootstrap over "
            f"{rp.esc(iv.get('units', '?'))} {rp.esc(iv.get('unit', '?'))}"
            + (f" of {rp.num(iv['block_m'], 0)} m" if iv.get("block_m") else "") + ".</p>")
    if b:
        text += f"<p>Baseline: {rp.esc(b.get('name', 'baseline'))}, same folds.</p>"
    text += pd.DataFrame(rows).fillna("-").to_html(index=False, escape=False, border=0)
    text += (f"<p>Permutation null, poor/rich AUC: CNN {rp.p_value(perm.get('auc_poor_rich'))}; "
             f"baseline {rp.p_value(perm.get('baseline_auc_poor_rich'))}.</p>")
    note = iv.get("over_folds", {}).get("note")
    if note:
        text += f"<p>{rp.flag(note)}</p>"
    return text + rp.figures(folder / city / "figures", city)


def training_part(folder: Path) -> str:
    names = cities(folder)
    if not names:
        return rp.not_run("training", "efficientnet_training.py")
    body = ""
    summary = rp.read_csv(folder / "training_summary.csv")
    if summary is not None:
        body += "<h3>All cities (training_summary.csv; means over folds)</h3>" + rp.table(summary)
    return body + "".join(f"<h3>{rp.esc(c)}</h3>" + city_metrics(folder, c) for c in names)


def _landuse_table(path: Path, title: str) -> str:
    s = rp.read_csv(path)
    if s is None:
        return ""
    first = s.iloc[0] if len(s) else {}
    head = f"<h3>{rp.esc(title)}</h3>"
    if len(s) and "model_auc" in s.columns:
        head += (f"<p>Model poor/rich AUC behind these maps {rp.interval(first['model_auc'], first.get('model_auc_lo'), first.get('model_auc_hi'))}"
                 f" over {rp.esc(first.get('model_auc_units', '?'))} {rp.esc(first.get('model_auc_unit', ''))}.</p>")
    if len(s) and "meaningful" in s.columns and not s["meaningful"].astype(str).str.lower().eq("true").all():
        head += f"<p>{rp.flag(str(first.get('caveat') or 'ranking not meaningful'))}</p>"
    if len(s) and "maps_pass_sanity" in s.columns and not s["maps_pass_sanity"].astype(str).str.lower().eq("true").all():
        head += f"<p>{rp.flag('the CAMs failed their sanity check (model randomisation): the ranking says nothing')}</p>"
    return head + rp.table(s[[c for c in LANDUSE_COLUMNS if c in s.columns]], digits=4)


def landuse_part(folder: Path) -> str:
    pooled = folder / "landuse_summary.csv"
    per_city = [(c, folder / c / "landuse_summary.csv") for c in cities(folder)]
    if not pooled.is_file() and not any(p.is_file() for _, p in per_city):
        return rp.not_run("land-use ranking", "gradcaming_urban_areas.py")
    body = ("<p>Urban Atlas classes ranked by <code>rich_minus_poor</code>: the class's mean richest-class CAM "
            "score over its pieces minus its mean poorest-class score; each mean with its 95 % bootstrap interval "
            "(<code>_lo</code>, <code>_hi</code>). A ranking flagged as not meaningful, or whose maps fail the sanity "
            "check, says nothing about the land uses.</p>")
    body += _landuse_table(pooled, "All cities pooled (landuse_summary.csv)")
    body += rp.image(folder / "landuse_scores.png", "land-use scores, all cities", 700) if (folder / "landuse_scores.png").is_file() else ""
    return body + "".join(_landuse_table(p, f"{c} ({c}/landuse_summary.csv)") for c, p in per_city)


def _agreement_rows(a: dict) -> list[dict]:
    rows = []
    for key, block in a.items():
        if isinstance(block, dict) and "rho" in block:
            iv = block.get("interval", {})
            rows.append({"cells": block.get("cells", key), "truth": block.get("truth", ""), "n": block.get("n"),
                         "Spearman rho [95 % interval]": rp.interval(block["rho"], iv.get("lo"), iv.get("hi")),
                         "resampled": f"{iv.get('units', '?')} {iv.get('resampled', '')}",
                         "p (one-sided)": rp.num(block.get("p_one_sided"), 3) if block.get("p_one_sided", 1) >= 1e-3
                         else f"{block['p_one_sided']:.1e}"})
    return rows


def prediction_part(folder: Path) -> str:
    done = [c for c in cities(folder) if (folder / c / "predicted").is_dir()]
    if not done:
        return rp.not_run("income maps of new cells", "predict_income.py")
    body = ""
    for c in done:
        body += f"<h3>{rp.esc(c)}</h3>"
        a = rp.read_json(folder / c / "predicted" / "agreement.json")
        if a:
            body += pd.DataFrame(_agreement_rows(a)).to_html(index=False, escape=True, border=0)
            if a.get("cells_by_scoring"):
                body += rp.pairs((k, rp.esc(v)) for k, v in a["cells_by_scoring"].items())
        body += rp.figures(folder / c / "predicted" / "figures", c)
    return body


def map_part(folder: Path) -> str:
    names = cities(folder)
    if not names:
        return rp.not_run("map of the cells", "efficientnet_training.py")
    return "".join(f"<h3>{rp.esc(c)}</h3>" + rp.guarded(report_map.city_map, folder, c, f"map-{i}")
                   for i, c in enumerate(names))


PARTS = (("extraction", "Cells and census", extraction_part),
         ("training", "Per-city results: metrics, baseline and null", training_part),
         ("landuse", "Land-use ranking", landuse_part),
         ("prediction", "Income maps and their agreement", prediction_part),
         ("map", "Interactive map", map_part))


def render(folder: Path) -> str:
    """The page of the SES results folder ``folder`` (``<results>/ses``)."""
    return rp.pipeline_page("urbanlens: socioeconomic status from aerial images", Path(folder), PARTS,
                            report_map.SCRIPT)
