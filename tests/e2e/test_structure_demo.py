"""The SES demo's claim, on its own setting and world (one city): where the income lives in the houses'
arrangement, the CNN beats the colour/texture baseline on unseen 1 km blocks by a clear margin
(tests/structure_demo.py says how and what was measured; test_structure_off.py is the same world
without the arrangement)."""
import pytest

from structure_demo import MARGIN, run


@pytest.fixture(scope="module")
def arranged(tmp_path_factory):
    return run(tmp_path_factory.mktemp("structure1"), 1.0)


def test_cnn_beats_the_baseline_where_income_lives_in_the_arrangement(arranged):
    assert arranged["gain"]["lo"] > 0 and arranged["gain"]["value"] > MARGIN, arranged
    assert arranged["cnn"] > 0.5 + MARGIN and arranged["p"] <= 0.05, arranged
