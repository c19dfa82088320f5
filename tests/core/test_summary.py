"""results/<demo>/summary.md: the demo's table, every number read from the files the stages wrote."""
import json

import yaml

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


def test_a_city_trained_on_the_arrangement_world_says_so(tmp_path):
    """The SES rows name where the world planted income: the arrangement (ses.world.structure > 0) is said
    beside the city; composition or a run without world keys says nothing more."""
    for name, world in (("arranged", {"structure": 1.0, "house_share": 0.7}), ("composed", {"structure": 0.0}),
                        ("real", None)):
        (tmp_path / name).mkdir()
        cfg = {"ses": {"cities": ["Paris"], **({"world": world} if world is not None else {})}}
        (tmp_path / name / "train_config.yaml").write_text(yaml.safe_dump(cfg))
    assert summary.planted(tmp_path / "arranged") == " (income in the houses' arrangement, ses.world.structure 1)"
    assert summary.planted(tmp_path / "composed") == summary.planted(tmp_path / "real") == ""
    assert summary.planted(tmp_path / "missing") == ""
