"""results/<demo>/summary.md: the demo's table, every number read from the files the stages wrote."""
import json

from urbanlens import summary


def test_the_table_reads_the_numbers_the_stages_wrote(cities_world, tmp_path):
    metrics = json.loads((cities_world / "results" / "cities" / "metrics.json").read_text())
    root = tmp_path / "results"
    root.mkdir()
    (root / "cities").symlink_to(cities_world / "results" / "cities")
    summary.main(["--results", str(root), "--cities", "Paris", "--timing", "cities=12"])
    text = (root / "summary.md").read_text()
    lo, hi = metrics["intervals"]["accuracy"]
    assert f"CNN {metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert f"baseline {metrics['baseline']['accuracy']:.3f}" in text
    assert f"{metrics['intervals']['units_total']} source images" in text
    assert "| ses | Paris | (no metrics.json) | - |" in text   # a missing file leaves its row saying so
    assert "cities 12 s" in text and "load average" in text and "differ slightly between processors" in text


def test_intervals_and_p_values_are_written_as_read():
    assert summary._iv({"value": 0.5, "lo": 0.25, "hi": 0.75}) == "0.50 [0.25, 0.75]"
    assert summary._iv({"value": 0.5, "lo": None, "hi": None}) == "0.50"
    assert summary._iv(None) == "-"
    assert summary._p(0.2).endswith("(not distinguishable from chance)") and summary._p(0.001) == "p = 0.001"
