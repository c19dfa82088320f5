"""Negative control of the land-use findings: models trained on shuffled incomes must not yield rankings
called meaningful.

On the tiny SES world of the end-to-end tests (world and cell images only, no pipeline training), each
city's incomes are shuffled across its cells, ``SHUFFLES`` times with distinct seeds; each time a small
CNN with the income model's binomial head is trained by 2-fold cross-validation, and its held-out
predictions and guided Grad-CAM maps go through exactly what gradcaming_urban_areas.py applies to a
city's ranking: the held-out skill (urbanlens.ses.findings) and the sanity check of the maps
(urbanlens.ses.map_sanity). The pieces' statistics are given as non-zero, so only those two can flag it.

Robust on any machine: a single shuffled model's AUC interval excludes 0.5 by chance (upwards about
2.5 % of the time, somewhat more as the bootstrap on a few dozen cells undercovers), so the test asserts
on the rate over all shuffled models, with a bound far above that chance (at most 7 of 20 meaningful:
with a per-model chance as high as 10 % that fails once in 2 400 runs, at 5 % once in 350 000; a flag
that read the AUC without its interval would give about 10 of 20, no flag 20). Measured on this world: 2 of 60
shuffled models (30 a city) had an interval above 0.5, mean AUC 0.52 (Paris) and 0.50 (Lyon), spread
0.09 and 0.12 between models. The maps' check runs on 8 cells a model (the stage's default is 16) to
keep the test near 45 s of CPU.
"""
import os

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from torch.nn import functional as F

from urbanlens.core import backbones, config, sanity
from urbanlens.core.placement import Placement
from urbanlens.ses import data, findings, map_sanity
from urbanlens.ses.model import N_CLASSES, binomial_log_probs
from script_runner import run_script

CITIES = ("Paris", "Lyon")
SHUFFLES = 10          # per city: 20 shuffled models in all
SIZE = 32              # model input, pixels
CONFIG = "tests/conf/ses_e2e.yaml"  # the world of tests/e2e/test_e2e_ses.py


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("ses_null")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for stage in (["-m", "urbanlens.ses.world"], ["generate_fr_ua_aerial_data.py"]):
        proc = run_script(stage, root / "data", root / "results", (), CONFIG, env=env, check=False, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ses_dir = root / "results" / "ses"
    table = gpd.read_file(ses_dir / "cells.gpkg")
    return ses_dir, {c: data.city_cells(table, c, ses_dir)[0] for c in CITIES}


class Small(nn.Module):
    """Three convolutions and the income model's head (one logit read as a binomial over 5 quintiles)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return binomial_log_probs(self.head(self.features(x).mean(dim=(2, 3))))


def _train(x, y, seed):
    torch.manual_seed(seed)
    model = Small()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def _shuffled_finding(ses_dir, city_cells, x, seed, cams):
    """The finding of a city whose incomes are shuffled with ``seed``: held-out skill and map sanity."""
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(data.income_quintiles(rng.permutation(city_cells["income"].to_numpy(float))))
    preds, first = [], None
    for train, test in StratifiedKFold(2, shuffle=True, random_state=seed).split(np.zeros(len(y)), y.numpy()):
        model = _train(x[train], y[train], seed)
        first = model if first is None else first
        with torch.no_grad():
            p = model(x[test]).exp().numpy()
        preds.append(pd.DataFrame({"true_class": y[test].numpy(), **{f"p_{k}": p[:, k] for k in range(N_CLASSES)}}))
    stats = pd.DataFrame({"poor_max": [1.0], "rich_max": [1.0]})
    finding = findings.city_finding(pd.concat(preds, ignore_index=True), stats, seed=seed)
    checks = map_sanity.check_city(first, backbones.last_conv_layer(first), city_cells, ses_dir, SIZE, cams,
                                   Placement("cpu", cams.amp, True), seed)
    verdict = sanity.summarise(*checks)
    return map_sanity.flag(finding, verdict), verdict


def test_shuffled_incomes_give_rankings_flagged_not_meaningful(cells):
    torch.set_num_threads(1)
    ses_dir, per_city = cells
    cams = config.load_config(None).ses.cams
    cams["sanity_cells"] = 8
    results = []
    for city, city_cells in per_city.items():
        assert len(city_cells) > 60, (city, len(city_cells))  # enough cells for a skill interval
        x = torch.stack([data.load_cell_image(ses_dir / p, SIZE) for p in city_cells["path"]])
        for i in range(SHUFFLES):
            finding, verdict = _shuffled_finding(ses_dir, city_cells, x, 1000 * i + len(results), cams)
            results.append((city, finding, verdict))
    meaningful = [(c, f.auc, f.lo, v.rho, v.deletion_gain) for c, f, v in results if f.meaningful]
    aucs = np.array([f.auc for _, f, _ in results])
    failed = sum(not v.passes for *_, v in results)
    print(f"[negative control] {len(meaningful)} of {len(results)} shuffled models meaningful, mean AUC "
          f"{aucs.mean():.3f}, maps failing their check {failed}")
    assert len(meaningful) <= 7, meaningful
    for _, f, v in results:  # every flagged ranking says why, maps that fail their check included
        assert f.meaningful or f.caveat.startswith("ranking not meaningful: ")
        assert v.passes or v.reason in f.caveat
