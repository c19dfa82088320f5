"""Which patches choose the model: the validation scheme ``cities.split.val``.

``paper``: the manifest as preprocessing.py cut it; the validation patches are the right halves of the
test site's images, so early stopping and ``best.pt`` see the site the model is tested on.
``site``: the last train site of each city (sorted by name) is held out of training and gives the
validation patches; the test site's right halves are not used. Nothing of the test site then chooses the
model. It needs 3 sites a city (training sites, the validation site, the test site). The test and test_b
patches are the same under both schemes, so their numbers compare.
"""
from __future__ import annotations

import pandas as pd

from ..core.errors import DataError
from ..core.schema import VAL_SCHEMES


def validation_sites(manifest: pd.DataFrame) -> dict[str, str]:
    """``{iata: site}``: the last (sorted) train site of each city; DataError naming the first city with
    fewer than 2 train sites (3 sites in all)."""
    train = manifest[manifest["split"] == "train"]
    out = {}
    for iata in sorted(manifest["iata"].unique()):
        sites = sorted(train.loc[train["iata"] == iata, "site"].unique())
        if len(sites) < 2:
            raise DataError(f"cities.split.val=site: city {iata} has {len(sites) + 1} sites, the scheme needs 3 or more "
                            "(training sites, a validation site, the test site); add a site folder and re-run "
                            "preprocessing.py, or use --set cities.split.val=paper")
        out[iata] = sites[-1]
    return out


def training_splits(manifest: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """``manifest`` with its train and val rows as ``scheme`` assigns them (test and test_b unchanged)."""
    if scheme not in VAL_SCHEMES:
        raise ValueError(f"unknown validation scheme '{scheme}'; choose one of {', '.join(VAL_SCHEMES)}")
    if scheme == "paper":
        return manifest
    held = validation_sites(manifest)
    out = manifest[manifest["split"] != "val"].copy()
    is_val = (out["split"] == "train") & (out["site"] == out["iata"].map(held))
    out.loc[is_val, "split"] = "val"
    return out.reset_index(drop=True)


def store_name(split: str, scheme: str) -> str:
    """The name of ``split``'s decoded store under ``scheme`` (each scheme keeps its own, so switching
    schemes does not rebuild the other's)."""
    return split if scheme == "paper" else f"{split}_val{scheme}"
