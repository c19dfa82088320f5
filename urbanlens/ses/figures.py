"""Figures of the SES pipeline: confusion matrices, income maps, activation-map panels, land-use scores."""
from __future__ import annotations

import numpy as np
import pandas as pd
import shapely
from matplotlib.collections import PatchCollection
from matplotlib.patches import Patch, PathPatch
from matplotlib.path import Path
from sklearn import metrics as skm

from ..core.plotting import plt
from . import findings
from .model import CLASS_NAMES


def confusion_figure(cm, title: str = ""):
    """A matplotlib figure of a confusion matrix with the quintile names."""
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    skm.ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(CLASS_NAMES)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    return fig


QUINTILE_CMAP = "RdYlGn"


def polygon_collection(geoms, facecolors="none", edgecolor="k", linewidth=0.4) -> PatchCollection:
    """Polygons and multipolygons (holes kept) as one matplotlib collection, drawn in one go.

    (GeoDataFrame.plot redraws the whole figure after each call, which is slow for a grid of axes.)
    """
    patches = []
    for g in geoms:
        rings = [r for poly in shapely.get_parts(g) for r in (poly.exterior, *poly.interiors)]
        paths = [Path(np.asarray(r.coords)[:, :2], closed=True) for r in rings]
        patches.append(PathPatch(Path.make_compound_path(*paths)))
    return PatchCollection(patches, facecolors=facecolors, edgecolors=edgecolor, linewidths=linewidth)


def income_map_figure(cells, predictions: pd.DataFrame, city: str):
    """Two maps of a city's cells: observed income quintile | predicted expected class (0..4).

    ``cells``: GeoDataFrame with cell_id and geometry; ``predictions``: cell_id, true_class,
    expected_class (the training stage's predictions.csv). Cells without a prediction are not drawn.
    """
    df = cells[["cell_id", "geometry"]].merge(predictions[["cell_id", "true_class", "expected_class"]],
                                              on="cell_id", how="inner")
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharex=True, sharey=True, constrained_layout=True)
    for ax, col, title in ((axes[0], "true_class", "observed income quintile"),
                           (axes[1], "expected_class", "predicted (expected class)")):
        colours = plt.get_cmap(QUINTILE_CMAP)(df[col].to_numpy(float) / 4)
        ax.add_collection(polygon_collection(df.geometry, colours, edgecolor="none"))
        ax.autoscale_view()
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("easting, EPSG:3035 (m)", fontsize=7)
    axes[0].set_ylabel("northing, EPSG:3035 (m)", fontsize=7)
    sm = plt.cm.ScalarMappable(cmap=QUINTILE_CMAP, norm=plt.Normalize(0, 4))
    fig.colorbar(sm, ax=axes, shrink=0.8, label="quintile (0 poorest, 4 richest)")
    fig.suptitle(f"{city}: {len(df)} cells")
    return fig


def class_colours(codes) -> dict:
    """A fixed colour per land-use code (sorted codes mapped onto tab20), shared by every panel."""
    codes = sorted({str(c) for c in codes})
    cmap = plt.get_cmap("tab20")
    return {c: cmap(i % 20) for i, c in enumerate(codes)}


def cam_panels_figure(panels: list[dict], class_names: dict | None = None):
    """A row per cell: image | poor-class map | rich-class map | Urban Atlas pieces coloured by class.

    Each panel dict holds cell_id, image ([H, W, 3] array), poor and rich ([H, W] maps in [0, 1]),
    bounds (west, south, east, north, in the pieces' CRS) and pieces (GeoDataFrame with ua_code).
    ``class_names`` maps ua_code to a label for the legend.
    """
    codes = [c for p in panels for c in p["pieces"]["ua_code"]]
    colours = class_colours(codes)
    fig, axes = plt.subplots(len(panels), 4, figsize=(13, 3.2 * len(panels)), squeeze=False,
                             constrained_layout=True)
    for row, p in zip(axes, panels):
        w, s, e, n = p["bounds"]
        extent = (w, e, s, n)
        row[0].imshow(p["image"], extent=extent)
        for ax, key, cmap in ((row[1], "poor", "Blues"), (row[2], "rich", "Reds")):
            ax.imshow(p[key], extent=extent, cmap=cmap, vmin=0, vmax=1)
            ax.add_collection(polygon_collection(p["pieces"].geometry))
        pieces = p["pieces"]
        row[3].add_collection(polygon_collection(pieces.geometry, [colours[str(c)] for c in pieces["ua_code"]]))
        for ax in row:
            ax.set_xlim(w, e)
            ax.set_ylim(s, n)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        row[0].set_ylabel(p["cell_id"], fontsize=7)
    for ax, title in zip(axes[0], ("image", "poorest-class map", "richest-class map", "Urban Atlas")):
        ax.set_title(title)
    names = class_names or {}
    handles = [Patch(facecolor=col, edgecolor="k", label=f"{c} {names.get(c, '')}".strip())
               for c, col in colours.items()]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=7)
    return fig


def landuse_scores_figure(summary: pd.DataFrame, title: str = ""):
    """Horizontal bars of mean poor and rich score per land-use class, with their 95 % intervals.

    ``summary``: output of zonal.landuse_summary, annotated by findings.annotate (then the title gives
    the model's held-out skill and, when the ranking is not meaningful, says so); classes ordered by
    rich_minus_poor.
    """
    df = summary.sort_values("rich_minus_poor").reset_index(drop=True)
    y = np.arange(len(df))
    h = 0.38
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(df) + 1.5), constrained_layout=True)
    for off, name, colour in ((-h / 2, "poor", "tab:blue"), (h / 2, "rich", "tab:red")):
        m = df[f"{name}_score_mean"].to_numpy(float)
        lo = np.nan_to_num(m - df[f"{name}_score_lo"].to_numpy(float))
        hi = np.nan_to_num(df[f"{name}_score_hi"].to_numpy(float) - m)
        ax.barh(y + off, m, height=h, color=colour, label=f"{name}est-class score",
                xerr=np.vstack([lo, hi]), error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks(y, [f"{c} {n}"[:48] for c, n in zip(df["ua_code"], df["ua_class"])], fontsize=7)
    ax.set_xlabel("map sum per m$^2$ (mean over pieces, 95 % interval)")
    ax.set_ylim(-0.7, len(df) - 0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    finding = findings.from_summary(summary)
    if finding is None:
        ax.set_title(title)
        return fig
    note = findings.describe(finding).replace("; ranking", ";\nranking").replace("; the", ";\nthe")
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=8,
                 color="black" if finding.meaningful else "firebrick")
    return fig


def _cell_map(ax, cells, values, title: str, cmap: str = QUINTILE_CMAP, vmax: float = 4.0) -> None:
    """Cells coloured by ``values`` (0..vmax; NaN grey) on EPSG:3035 axes."""
    values = np.asarray(values, dtype=float)
    colours = plt.get_cmap(cmap)(np.clip(values / vmax, 0, 1))
    colours[~np.isfinite(values)] = (0.8, 0.8, 0.8, 1.0)
    ax.add_collection(polygon_collection(cells.geometry, colours, edgecolor="none"))
    ax.autoscale_view()
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=6)
    ax.set_xlabel("easting, EPSG:3035 (m)", fontsize=7)


def predicted_map_figure(cells, city: str):
    """The predicted income of every mapped cell (expected class 0..4; void cells grey, cells the census
    knows outlined) | the spread of the fold models' expected classes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharex=True, sharey=True, constrained_layout=True)
    _cell_map(axes[0], cells, cells["expected_class"], "predicted income (expected class)")
    census = cells[np.isfinite(cells["census_income"].to_numpy(float))]
    axes[0].add_collection(polygon_collection(census.geometry, edgecolor="k", linewidth=0.3))
    spread = cells["fold_spread"].to_numpy(float)
    top = float(np.nanmax(spread)) if np.isfinite(spread).any() and np.nanmax(spread) > 0 else 1.0
    _cell_map(axes[1], cells, spread, "spread over fold models (std of expected class)", "viridis", top)
    axes[0].set_ylabel("northing, EPSG:3035 (m)", fontsize=7)
    fig.colorbar(plt.cm.ScalarMappable(cmap=QUINTILE_CMAP, norm=plt.Normalize(0, 4)), ax=axes[0], shrink=0.7,
                 label="expected class (0 poorest, 4 richest)")
    fig.colorbar(plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, top)), ax=axes[1], shrink=0.7)
    fig.suptitle(f"{city}: {len(cells)} cells, {len(census)} in the census (outlined)")
    return fig


def observed_vs_predicted_figure(cells, city: str, rho: float, p: float, kind: str = "census cells"):
    """For the cells the census knows (``kind`` names which, e.g. scored out-of-fold): observed quintile
    map | predicted map | income vs expected class."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), constrained_layout=True)
    _cell_map(axes[0], cells, cells["observed_class"], "census income quintile (training edges)")
    _cell_map(axes[1], cells, cells["expected_class"], "predicted (expected class)")
    axes[1].sharex(axes[0])
    axes[1].sharey(axes[0])
    axes[2].scatter(cells["census_income"], cells["expected_class"], s=8, alpha=0.6)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("census income (ind_snv / ind)")
    axes[2].set_ylabel("predicted expected class")
    axes[2].set_ylim(-0.1, 4.1)
    axes[2].set_title(f"Spearman {rho:.2f} (one-sided p {p:.2g}), {len(cells)} cells", fontsize=9)
    fig.suptitle(f"{city}: observed vs predicted income, {kind}")
    return fig
