"""How the test numbers are said: the figure-title note and the closing line of test_classification.py,
from the metrics.json dict (pure functions of it)."""
from __future__ import annotations

from .null import CHANCE


def _interval(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def title_note(metrics: dict) -> str:
    """What a figure title must add: too few resampling units, and an accuracy not above chance."""
    notes = []
    if metrics.get("permutation", {}).get("accuracy", {}).get("chance"):
        notes.append(f"accuracy {CHANCE}")
    if metrics["intervals"].get("note"):
        notes.append(metrics["intervals"]["note"])
    return "; ".join(notes)


def with_note(title: str, metrics: dict) -> str:
    """``title`` with ``title_note`` on a second line when there is one."""
    note = title_note(metrics)
    return f"{title}\n{note}" if note else title


def _p(entry: dict) -> str:
    return f"p={entry['p_value']:.3g}" + (f", {CHANCE}" if entry["chance"] else "")


def headline(metrics: dict) -> str:
    """``accuracy a [lo, hi] vs baseline b [lo, hi], gain g [lo, hi]; permutation p=...; intervals over
    N <unit> (n per city)`` and the note on too few units, when there is one."""
    iv, perm = metrics["intervals"], metrics.get("permutation", {})
    text = f"accuracy {metrics['accuracy']:.3f} {_interval(iv['accuracy'])}"
    if "baseline" in metrics:
        b, g = metrics["baseline"], metrics["gain_over_baseline"]["accuracy"]
        text += (f" vs baseline {b['accuracy']:.3f} {_interval(b['intervals']['accuracy'])}, "
                 f"gain {g['value']:+.3f} {_interval((g['lo'], g['hi']))}")
    if "accuracy" in perm:
        text += f"; permutation {_p(perm['accuracy'])}"
        if "baseline_accuracy" in perm:
            text += f" (baseline {_p(perm['baseline_accuracy'])})"
    per_city = sorted(set(iv["units_per_city"].values()))
    counts = str(per_city[0]) if len(per_city) == 1 else f"{per_city[0]}-{per_city[-1]}"
    text += f"; {iv['level']:.0%} intervals over {iv['units_total']} {iv['unit']} ({counts} per city)"
    return text + (f": {iv['note']}" if iv.get("note") else "")
