"""The other half of the SES demo's claim (test_structure_demo.py): the same world and seed with
ses.world.structure 0, its income in land-use composition, which colour statistics read directly; there
the CNN does not beat the baseline (tests/structure_demo.py: how, and what was measured)."""
import pytest

from structure_demo import run


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return run(tmp_path_factory.mktemp("structure0"), 0.0)


def test_cnn_does_not_beat_the_baseline_where_income_lives_in_composition(composed):
    assert composed["gain"]["lo"] <= 0, composed
    assert composed["baseline"] > 0.5, composed   # the baseline reads composition
