"""MODEL_CARD.md beside every trained model: what it was trained on, how good it is, where not to use it.

The text is built by pure functions from what the run wrote (its metrics.json, run stamp, config and
training log); no number in it is typed here. The cities model's card is written by the training stage
(no test metrics yet) and rewritten by the test stage; each SES city's card by the training stage,
once its metrics.json is written.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

NAME = "MODEL_CARD.md"


# ---- formatting ----------------------------------------------------------------------------------

def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def with_interval(value: Any, lo: Any = None, hi: Any = None, level: float = 0.95) -> str:
    """``0.939 (95% CI 0.915 to 0.964)``; the value alone when the interval is unknown."""
    if lo is None or hi is None:
        return _num(value)
    return f"{_num(value)} ({level:.0%} CI {_num(lo)} to {_num(hi)})"


def gain_verdict(gain: Mapping[str, Any] | None, model: str = "the model", baseline: str = "the baseline") -> str:
    """What a gain interval (``value``, ``lo``, ``hi``: model minus baseline) says, in words."""
    if not gain or gain.get("lo") is None:
        return "no comparison with the baseline was run"
    if gain["lo"] > 0:
        return f"{model} scores higher than {baseline} (the gain's interval is above 0)"
    if gain["hi"] < 0:
        return f"{baseline} scores higher than {model} (the gain's interval is below 0): prefer it, or trust {model}'s number less"
    return f"{model} and {baseline} cannot be told apart (the gain's interval spans 0)"


def stamp_digest(stamp_text: str) -> str:
    """The first 12 hex digits of the SHA-256 of a run stamp's text (stamps of the same run are
    byte-identical, so equal digests mean same settings and inputs)."""
    return hashlib.sha256(stamp_text.encode("utf-8")).hexdigest()[:12]


def _settings_lines(settings: Mapping[str, Any]) -> list[str]:
    return [f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items()]


def _stamp_section(stamp_name: str, stamp_text: str | None) -> list[str]:
    if not stamp_text:
        return ["## Run stamp", "", f"No run stamp ({stamp_name}) was found.", ""]
    stamp = json.loads(stamp_text)
    inputs = stamp.get("inputs", {})
    return ["## Run stamp", "",
            f"`{stamp_name}` (written by {stamp.get('stage', '?')}), SHA-256 `{stamp_digest(stamp_text)}`; "
            + (f"{len(inputs)} input fingerprint(s): {', '.join(f'`{k}`' for k in list(inputs)[:5])}"
               + (" ..." if len(inputs) > 5 else "") + "." if inputs else "no input fingerprint."), "",
            "The settings the model depends on:", "", "| key | value |", "|---|---|",
            *_settings_lines(stamp.get("settings", {})), ""]


def _weights_lines(model: Mapping[str, Any]) -> list[str]:
    """Where the weights came from and under what licence (``docs/backbones.md``)."""
    from .weights_source import licence

    spec = str(model.get("backbone"))
    if not (model.get("pretrained") or model.get("weights_path")):
        return ["## Weights", "", f"- backbone `{spec}`, trained from scratch (random initial weights)", ""]
    return ["## Weights", "", f"- backbone `{spec}`, started from its pretrained weights"
            + (f" (file `{model.get('weights_path')}`)" if model.get("weights_path") else ""),
            f"- licence of those weights: {licence(spec)}; yours inherit its terms",
            "- their normalisation, band order and input size are recorded in each checkpoint (`preprocessing`)", ""]


def _data_lines(cfg: Mapping[str, Any], synthetic: bool) -> list[str]:
    return [f"- data: `{cfg.get('paths', {}).get('data')}`"
            + (" (a synthetic world built by this project, not real imagery)" if synthetic else ""),
            f"- config: `{cfg.get('config_file') or 'built-in defaults'}` (the full resolved config is saved beside "
            "the model), seed {}".format(cfg.get("seed")), ]


def _chance_lines(permutation: Mapping[str, Any] | None) -> list[str]:
    """One line per permutation test of ``permutation``."""
    if not permutation:
        return ["- permutation null: not run"]
    out = []
    for name, test in permutation.items():
        if isinstance(test, dict) and "p_value" in test:
            verdict = "not distinguishable from chance" if test.get("chance") else "above chance"
            out.append(f"- {name}: permutation p = {_num(test['p_value'])} over {permutation.get('permutations')} "
                       f"label permutations: {verdict}")
    return out or ["- permutation null: not run"]


def _at_chance(permutation: Mapping[str, Any] | None) -> list[str]:
    return [k for k, t in (permutation or {}).items() if isinstance(t, dict) and t.get("chance")]


def _beside_baseline(lines: list, limits: list, metrics: Mapping[str, Any], name: str, same: str,
                     baseline_text: str | None, level: float, key: str, beaten: str) -> None:
    """The baseline's ``name`` (``baseline_text``, None when it was not run: ``key`` false), the gain over
    it and the permutation null, added to ``lines``; what they limit, to ``limits``."""
    base = metrics.get("baseline")
    if base:
        gain = (metrics.get("gain_over_baseline") or {}).get(name)
        lines += [f"- baseline ({base.get('name')}), {same}: {name} {baseline_text}",
                  f"- gain over the baseline ({name}): "
                  + (with_interval(gain.get("value"), gain.get("lo"), gain.get("hi"), level) if gain else "n/a")
                  + f"; {gain_verdict(gain)}"]
        if gain and gain.get("hi") is not None and gain["hi"] < 0:
            limits.append(f"The simple baseline beats {beaten}.")
    else:
        lines.append(f"- baseline: not run (`{key}: false`)")
        limits.append("No baseline was scored: the metrics have nothing simple to stand beside.")
    lines += _chance_lines(metrics.get("permutation"))
    if _at_chance(metrics.get("permutation")):
        limits.append(f"Not distinguishable from chance: {', '.join(_at_chance(metrics.get('permutation')))}.")


# ---- the cities classifier -----------------------------------------------------------------------

def cities_card(cfg: Mapping[str, Any], stamp_name: str, stamp_text: str | None, log: Sequence[Mapping[str, Any]],
                metrics: Mapping[str, Any] | None = None, synthetic: bool = False) -> str:
    """MODEL_CARD.md of the city classifier: ``cfg`` (the resolved config as a dict), its run stamp's
    file name and text, the training log rows (train_log.csv) and, once tested, the test stage's
    metrics.json; ``synthetic`` when the data folder holds a synthetic world."""
    cities = cfg.get("cities", {})
    model, split, test = cities.get("model", {}), cities.get("split", {}), cities.get("test", {})
    lines = ["# Model card: city identification classifier", "",
             f"A {model.get('backbone')} classifier of image patches ({model.get('input_size')} px input, "
             f"{'pretrained weights' if model.get('pretrained') or model.get('weights_path') else 'trained from scratch'}) "
             "telling apart the cities it was trained on. Weights: `checkpoints/best.pt` (the epoch of highest "
             "validation accuracy).", "",
             *_weights_lines(model), "## Trained on", "", *_data_lines(cfg, synthetic),
             f"- validation scheme (`cities.split.val`): `{split.get('val')}`; test split (`cities.test.split`): `{test.get('split')}`"]
    if log:
        best = max(log, key=lambda r: (r.get("val_acc", -1), r.get("epoch", 0)))
        lines.append(f"- {len(log)} epoch(s) run; best validation accuracy {_num(best.get('val_acc'))} at epoch "
                     f"{best.get('epoch')} (used to choose the weights, so not a measure of skill)")
    lines += ["", *_stamp_section(stamp_name, stamp_text), "## Metrics", ""]
    limits = []
    if metrics is None:
        lines += ["Not tested yet: `test_classification.py` measures the model and rewrites this card.", ""]
    else:
        iv = metrics.get("intervals", {})
        level = iv.get("level", 0.95)
        lines += [f"On {metrics.get('n_patches')} patches of `{metrics.get('split')}` (validation scheme "
                  f"`{metrics.get('validation')}`, checkpoint epoch {metrics.get('checkpoint_epoch')}); intervals "
                  f"from {iv.get('n_boot')} bootstrap resamples of {iv.get('resampled', iv.get('unit'))} "
                  f"({iv.get('units_total')} in all).", "",
                  f"- accuracy: {with_interval(metrics.get('accuracy'), *(iv.get('accuracy') or (None, None)), level)}",
                  f"- macro F1: {with_interval(metrics.get('macro_f1'), *(iv.get('macro_f1') or (None, None)), level)}"]
        if "top5_accuracy" in metrics:
            lines.append(f"- top-5 accuracy: {_num(metrics['top5_accuracy'])}")
        base = metrics.get("baseline")
        biv = (base or {}).get("intervals", {})
        _beside_baseline(lines, limits, metrics, "accuracy", "same patches", base and with_interval(
            base.get("accuracy"), *(biv.get("accuracy") or (None, None)), level), level, "cities.test.baseline",
            "this model on the same test patches")
        if iv.get("note"):
            limits.append(f"Intervals: {iv['note']}.")
        lines.append("")
    lines += ["## Intended use", "",
              "Research on how alike cities look from above: classifying patches of the cities it was trained on "
              "(from the same kind of imagery, ground resolution and patch size) and ranking which cities it "
              "confuses. A new place is compared with these cities by `similar_cities.py`, never labelled as one "
              "of them.", "",
              "## Known limits", ""]
    if synthetic:
        limits.insert(0, "Trained and tested on a synthetic world: its numbers say the pipeline works, not how "
                         "well real cities can be told apart.")
    if split.get("val") == "paper":
        limits.append("Validation (`cities.split.val: paper`) uses the other half of the test site's images, so the "
                      "chosen epoch has seen that site; `cities.split.val: site` validates on a held-out training site.")
    limits += ["Patches of one source image are not independent: intervals resample source images, and a "
               "city with few images has a wide one.",
               "Not for cities outside the training set, other sensors or ground resolutions: it always "
               "answers with one of its own cities."]
    return "\n".join(lines + [f"- {t}" for t in limits]) + "\n"


# ---- the SES (income class) models of one city ---------------------------------------------------

_SES_METRICS = ("auc_poor_rich", "kappa_quadratic", "spearman", "accuracy", "macro_f1")


def ses_card(cfg: Mapping[str, Any], stamp_name: str, stamp_text: str | None, metrics: Mapping[str, Any],
             synthetic: bool = False) -> str:
    """MODEL_CARD.md of one city's income class models (one per fold): ``cfg`` (resolved config as a
    dict), its run stamp's file name and text, the city's metrics.json; ``synthetic`` when the data
    folder holds a synthetic world."""
    model, tc = cfg.get("ses", {}).get("model", {}), cfg.get("ses", {}).get("train", {})
    city, cv = metrics.get("city"), metrics.get("cv")
    iv = metrics.get("intervals", {})
    level = iv.get("level", 0.95)
    boot = iv.get("bootstrap", {})
    pooled = metrics.get("pooled", {})
    edges = metrics.get("quintile_edges") or []
    lines = [f"# Model card: income class models, {city}", "",
             f"{metrics.get('folds')} {model.get('backbone')} models (one per fold, `fold_<k>/best.pt`, "
             f"{model.get('input_size')} px input) scoring the 200 m census cells of {city} into 5 income classes "
             "(the city's training quintiles, class 0 the poorest) from orthophotos"
             + (f"; class limits (income): {', '.join(_num(float(e)) for e in edges)}" if edges else "") + ".", "",
             *_weights_lines(model), "## Trained on", "", *_data_lines(cfg, synthetic),
             f"- {metrics.get('n_cells')} cells of {city}; cross-validation `{cv}` with {metrics.get('folds')} folds"
             + (f", blocks of {tc.get('block_m')} m, buffer {tc.get('buffer_m')} m" if cv == "spatial" else ""),
             f"- best fold: {metrics.get('best_fold')}", "",
             *_stamp_section(stamp_name, stamp_text), "## Metrics", "",
             f"Out-of-fold over all {pooled.get('n')} cells (every cell scored by the model that did not train on "
             f"it); intervals from {iv.get('resamples')} bootstrap resamples of {iv.get('units')} {iv.get('unit')}"
             + (f" of {iv.get('block_m')} m" if iv.get("unit") == "blocks" else "") + ".", ""]
    for name in _SES_METRICS:
        if name in pooled:
            b = boot.get(name, {})
            lines.append(f"- {name}: {with_interval(pooled[name], b.get('lo'), b.get('hi'), level)}")
    limits = []
    base = metrics.get("baseline")
    bp, bauc = (base or {}).get("pooled", {}), (base or {}).get("intervals", {}).get("bootstrap", {}).get("auc_poor_rich", {})
    _beside_baseline(lines, limits, metrics, "auc_poor_rich", "same folds", base and with_interval(
        bp.get("auc_poor_rich"), bauc.get("lo"), bauc.get("hi"), level), level, "ses.baseline",
        "these models under the same folds")
    note = iv.get("over_folds", {}).get("note")
    if note:
        limits.append(f"Over folds: {note}.")
    lines += ["", "## Intended use", "",
              f"Research: mapping the relative income class of 200 m cells of {city} from orthophotos of the same "
              "product, cell size and pixels per cell (`predict_income.py` refuses others), out-of-fold where "
              "the census has the cells.", "", "## Known limits", ""]
    if synthetic:
        limits.insert(0, "Trained and tested on a synthetic world: its numbers say the pipeline works, not how "
                         "well real incomes can be read from imagery.")
    if cv != "spatial":
        limits.append(f"Cross-validation `{cv}` puts neighbouring cells in training and test folds: the metrics "
                      "are optimistic for new areas; `ses.train.cv: spatial` holds out blocks.")
    limits += ["Classes are this city's quintiles: a class means the same income in no other city, and the "
               "models are not for other cities.",
               f"{metrics.get('n_cells')} cells is a small sample: read the intervals, not the point values."]
    return "\n".join(lines + [f"- {t}" for t in limits]) + "\n"


# ---- writers -------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_cities_card(out_dir, cfg, stamp_name: str, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/MODEL_CARD.md`` of the cities model from the files of ``out_dir``
    (train_log.csv, the stamp ``stamp_name``) and ``metrics`` (None before testing)."""
    import pandas as pd

    from . import files

    out_dir = Path(out_dir)
    log_csv = out_dir / "train_log.csv"
    log = pd.read_csv(log_csv).to_dict("records") if log_csv.is_file() else []
    synthetic = (Path(cfg.paths.data) / "cities" / "truth.json").is_file()
    text = cities_card(cfg.to_dict(), stamp_name, _read(out_dir / stamp_name), log, metrics, synthetic)
    return files.write_text(out_dir / NAME, text)


def write_ses_card(city_dir, cfg, stamp_name: str, metrics: Mapping[str, Any]) -> Path:
    """Write ``<city_dir>/MODEL_CARD.md`` of a city's SES models from its ``metrics`` and stamp."""
    from . import files

    city_dir = Path(city_dir)
    synthetic = (Path(cfg.paths.data) / "ses_truth.json").is_file()
    text = ses_card(cfg.to_dict(), stamp_name, _read(city_dir / stamp_name), metrics, synthetic)
    return files.write_text(city_dir / NAME, text)
