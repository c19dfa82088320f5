"""The demo's table, written by the run that made its numbers: ``<results>/summary.md``.

    python -m urbanlens.summary --results results/demo [--timing cities=218 --timing ses=417 ...]

Every number in the table is read from the files the stages wrote (metrics.json, similar_pairs.csv,
similar_cities.csv, landuse_summary.csv, predicted/agreement.json); a file that is missing leaves its
row out and says so. The header names the machine, its load and the software, since float results
(and so the trained models and every number below) differ slightly between processors.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .core import entry, files

FLOAT_NOTE = ("Float results differ slightly between processors and library builds, so the same seed gives "
              "slightly different models and numbers on another machine.")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on: processor, cores, load averages, GPU, library versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "load_1_5_15": [round(x, 2) for x in load], "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _iv(d: dict | None, key: str = "value", digits: int = 2) -> str:
    """'v [lo, hi]' of a {value|mean, lo, hi} dict; '-' when absent."""
    if not isinstance(d, dict):
        return "-"
    v = d.get(key, d.get("mean"))
    if v is None or not np.isfinite(v):
        return "-"
    lo, hi = d.get("lo"), d.get("hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _p(p) -> str:
    if p is None or not np.isfinite(p):
        return "-"
    return f"p = {p:.2g}" + (" (not distinguishable from chance)" if p > 0.05 else "")


def _pair(v) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, (list, tuple)) and len(v) == 2 else "-"


def cities_rows(cities_dir: Path, label: str) -> list[list[str]]:
    """Rows of the city classifier's test metrics: CNN beside the baseline, gain, null, units."""
    m = _read_json(cities_dir / "metrics.json")
    if m is None:
        return [["cities", label, "(no metrics.json)", "-"]]
    iv = m.get("intervals", {})
    per_city = sorted(set(iv.get("units_per_city", {}).values())) or [0]
    unit = (f"{iv.get('units_total', '?')} {iv.get('unit', 'units')} "
            f"({per_city[0] if len(per_city) == 1 else f'{per_city[0]}-{per_city[-1]}'} per city)")
    what = (f"{m.get('split', 'test')} accuracy ({m.get('n_patches', '?')} patches; validation "
            f"`{m.get('validation', 'paper')}`), 95 % interval over {unit}")
    cnn = f"CNN {m['accuracy']:.3f} {_pair(iv.get('accuracy'))}"
    perm = m.get("permutation", {})
    rows = [["cities", label, what, f"{cnn}; permutation {_p(perm.get('accuracy', {}).get('p_value'))}"]]
    b = m.get("baseline")
    if b:
        g = m.get("gain_over_baseline", {}).get("accuracy")
        rows.append(["cities", "", f"baseline: {b.get('name', 'baseline')}, fitted on "
                     f"{b.get('train_patches', '?')} training patches, same test patches",
                     f"baseline {b['accuracy']:.3f} {_pair(b.get('intervals', {}).get('accuracy'))}; "
                     f"CNN gain {_iv(g, digits=3)}"])
    if iv.get("note"):
        rows[0][3] += f" ({iv['note']})"
    return rows


def twin_rows(cities_dir: Path, k: int) -> list[list[str]]:
    """The top-k similar pairs of each method, with their stability."""
    try:
        pairs = pd.read_csv(cities_dir / "similar_pairs.csv")
    except (OSError, ValueError):
        return []
    cells = []
    for method, p in pairs.groupby("method", sort=False):
        top = p.head(k)
        cells.append(f"{method}: " + ", ".join(f"{a}-{b} ({s:.2f})" for a, b, s in
                                                  zip(top["city_a"], top["city_b"], top.get("stability", [np.nan] * len(top)))))
    return [["cities", "", f"top-{k} similar pairs (stability: share of resamples in the top {k})", "; ".join(cells)]]


def new_city_rows(cities_dir: Path) -> list[list[str]]:
    rows = []
    for table in sorted((cities_dir / "new").glob("*/similar_cities.csv")):
        t = pd.read_csv(table)
        if t.empty:
            continue
        first = t.iloc[0]
        second = t.iloc[1] if len(t) > 1 else None
        sim = [c for c in t.columns if c.startswith("similarity")]
        lo = [c for c in t.columns if c.endswith("_lo")]
        hi = [c for c in t.columns if c.endswith("_hi")]
        def fmt(r):
            if not sim:
                return r["iata"]
            v = f"{r['iata']} {r[sim[0]]:.3f}"
            return v + (f" [{r[lo[0]]:.3f}, {r[hi[0]]:.3f}]" if lo and hi else "")
        rows.append(["cities", f"held-out city {table.parent.name}", "known city most similar by mean embedding "
                     "(95 % interval over its source images), then the next",
                     fmt(first) + (f"; next {fmt(second)}" if second is not None else "")])
    return rows


def planted(city_dir: Path) -> str:
    """Where the synthetic world the city was trained on plants income, from its train_config.yaml:
    " (income in the houses' arrangement, ses.world.structure 1)", "" when composition alone or not a
    synthetic world (no world keys)."""
    try:
        world = (yaml.safe_load((city_dir / "train_config.yaml").read_text()) or {}).get("ses", {}).get("world", {})
    except (OSError, yaml.YAMLError):
        return ""
    s = float((world or {}).get("structure") or 0.0)
    return f" (income in the houses' arrangement, ses.world.structure {s:g})" if s > 0 else ""


def ses_rows(ses_dir: Path, cities: list[str]) -> list[list[str]]:
    rows = []
    for city in cities:
        m = _read_json(ses_dir / city / "metrics.json")
        if m is None:
            rows.append(["ses", city, "(no metrics.json)", "-"])
            continue
        iv = m.get("intervals", {})
        cnn = iv.get("bootstrap", {}).get("auc_poor_rich")
        perm = m.get("permutation", {})
        what = (f"AUC poorest-vs-richest, held-out (`cv: {m.get('cv')}`, {m.get('folds')} folds, {m.get('n_cells')} "
                f"cells); 95 % bootstrap over {iv.get('units', '?')} {iv.get('unit', '?')}"
                + (f" of {iv['block_m']:.0f} m" if iv.get("block_m") and iv.get("unit") == "blocks" else ""))
        text = f"CNN {_iv(cnn)}, {_p(perm.get('auc_poor_rich', {}).get('p_value'))}"
        b = m.get("baseline") or {}
        if b.get("name"):
            bb = b.get("intervals", {}).get("bootstrap", {}).get("auc_poor_rich")
            text += (f"; baseline {_iv(bb)}, {_p(perm.get('baseline_auc_poor_rich', {}).get('p_value'))}; "
                     f"CNN gain {_iv(m.get('gain_over_baseline', {}).get('auc_poor_rich'))}")
        if iv.get("note"):
            text += f" ({iv['note']})"
        rows.append(["ses", city + planted(ses_dir / city), what, text])
    return rows


def landuse_rows(ses_dir: Path) -> list[list[str]]:
    try:
        s = pd.read_csv(ses_dir / "landuse_summary.csv")
    except (OSError, ValueError):
        return []
    if s.empty:
        return []
    r = s.iloc[0]
    verdict = "meaningful" if bool(r.get("meaningful", False)) else (r.get("caveat") or "not meaningful")
    sanity = ""
    if "maps_pass_sanity" in s.columns and pd.notna(r.get("maps_pass_sanity")):
        sanity = (f"; maps {'pass' if bool(r['maps_pass_sanity']) else 'fail'} the sanity checks (randomisation rho "
                  f"{r.get('sanity_randomisation_rho', float('nan')):.2f}, deletion gain "
                  f"{r.get('sanity_deletion_gain', float('nan')):.3f})")
    return [["ses", "all cities", "land-use class with the largest / smallest `rich_minus_poor`, pooled",
             f"{s.iloc[0]['ua_code']} / {s.iloc[-1]['ua_code']}; model AUC {r.get('model_auc', float('nan')):.2f} "
             f"[{r.get('model_auc_lo', float('nan')):.2f}, {r.get('model_auc_hi', float('nan')):.2f}]; {verdict}{sanity}"]]


def income_map_rows(ses_dir: Path) -> list[list[str]]:
    rows = []
    for path in sorted(ses_dir.glob("*/predicted/agreement.json")):
        a = _read_json(path) or {}
        for key in ("withheld", "census_out_of_fold"):
            g = a.get(key)
            if not g or not g.get("n"):
                continue
            iv = g.get("interval") or {}
            rho = g.get("rho")
            text = "-" if rho is None else f"rho {rho:.2f}"
            if iv.get("lo") is not None:
                text += f" [{iv['lo']:.2f}, {iv['hi']:.2f}] over {iv.get('units', '?')} {iv.get('unit', 'blocks')}"
            elif iv.get("note"):
                text += f" ({iv['note']})"
            text += f", one-sided p {g['p_one_sided']:.2g}" if g.get("p_one_sided") is not None else ""
            rows.append(["ses, income map", a.get("city", path.parent.parent.name),
                         f"Spearman(expected class, {g.get('truth')}) over {g['n']} {g.get('cells')}", text])
    return rows


def render(rows: list[list[str]], info: dict, timings: dict[str, float]) -> str:
    lines = ["# Demo results", "",
             f"Written by `bash run.sh` on {info['date']}: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}; "
             f"load average (1, 5, 15 min) at the end {', '.join(map(str, info['load_1_5_15']))}; Python "
             f"{info['python']}, torch {info['torch']}, numpy {info['numpy']}."]
    if timings:
        lines.append("Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".")
    lines += ["", FLOAT_NOTE, "",
              "| pipeline | world / city | what it checks | result |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="the demo's results folder (holds cities/ and ses/)")
    ap.add_argument("--cities", nargs="*", default=["Paris", "Lyon"], help="SES cities, in table order")
    ap.add_argument("--top-k", type=int, default=4, help="similar pairs shown per method")
    ap.add_argument("--timing", action="append", default=[], help="NAME=SECONDS, a stage's wall time")
    args = ap.parse_args(argv)
    root = Path(args.results)
    timings = {}
    for t in args.timing:
        name, _, secs = t.partition("=")
        timings[name] = float(secs)
    rows = (cities_rows(root / "cities", "validation on the test images' other half (paper)")
            + cities_rows(root / "val_site" / "cities", "validation on a held-out train site")
            + twin_rows(root / "cities", args.top_k) + new_city_rows(root / "cities")
            + ses_rows(root / "ses", args.cities) + landuse_rows(root / "ses") + income_map_rows(root / "ses"))
    files.write_text(root / "summary.md", render(rows, machine(), timings))
    print(f"[summary] {len(rows)} rows -> {root / 'summary.md'}")


if __name__ == "__main__":
    entry.run(main)
