"""The planted district leakage of the synthetic French world: off by default, continuous in space,
one field for the colour cast and the income shift, different from district to district."""
import numpy as np

from urbanlens.ses import world_leakage as wl
from urbanlens.ses import world_plan


def test_leakage_off_changes_nothing():
    rgb = np.random.default_rng(0).integers(1, 256, (50, 3)).astype(np.uint8)
    x, y = np.linspace(3.7e6, 3.705e6, 50), np.full(50, 2.8e6)
    assert wl.tint(rgb, x, y, 0.0, 0) is rgb
    assert (wl.income_shift(x, y, 0.0, 0) == 0).all()
    city = world_plan.plan_city("Paris", 0, 1200.0, 0)
    _, off = world_plan.census_for_city(city, 0.3, 0)
    _, zero = world_plan.census_for_city(city, 0.3, 0, 0.0)
    np.testing.assert_array_equal(off["income"], zero["income"])


def test_field_is_continuous_and_varies_between_districts():
    x = np.linspace(3.70e6, 3.71e6, 10_001)  # 1 m steps over 10 districts
    f = wl.district_field(x, np.full_like(x, 2.8e6 + 300), seed=3)
    assert np.abs(np.diff(f, axis=0)).max() < 0.05          # no jumps at district edges
    centres = wl.district_field(3.70e6 + 500 + 1000 * np.arange(10), np.full(10, 2.8e6 + 500), seed=3)
    assert centres.std(0).min() > 0.3                       # districts differ in every component
    np.testing.assert_array_equal(f, wl.district_field(x, np.full_like(x, 2.8e6 + 300), seed=3))
    # flat inside a district beyond its seams, so every 200 m cell centre carries its district's values
    inside = (x % wl.DISTRICT_M >= wl.SEAM_M) & (x % wl.DISTRICT_M <= wl.DISTRICT_M - wl.SEAM_M)
    district = np.floor(x / wl.DISTRICT_M)
    for d in np.unique(district[inside]):
        assert np.ptp(f[inside & (district == d)], axis=0).max() == 0
    assert not np.allclose(f, wl.district_field(x, np.full_like(x, 2.8e6 + 300), seed=4))


def test_cast_and_income_shift_come_from_one_field():
    """At district centres, the income shift is the field's 4th component times the strength and the
    cast its first three times TINT_LEVELS times the strength."""
    x, y = 3.70e6 + 500 + 1000 * np.arange(6), np.full(6, 2.8e6 + 500)
    f = wl.district_field(x, y, 1)
    np.testing.assert_allclose(wl.income_shift(x, y, 0.5, 1), 0.5 * f[:, 3])
    grey = np.full((6, 3), 128, np.uint8)
    np.testing.assert_allclose(wl.tint(grey, x, y, 0.5, 1).astype(float),
                               np.clip(np.rint(128 + 0.5 * wl.TINT_LEVELS * f[:, :3]), 1, 255))
    city = world_plan.plan_city("Paris", 0, 1200.0, 0)
    _, off = world_plan.census_for_city(city, 0.3, 0)
    _, on = world_plan.census_for_city(city, 0.3, 0, 1.0)
    from urbanlens.ses.grid import parse_inspire_id
    e, n = np.array([parse_inspire_id(c)[:2] for c in on["cell_id"]]).T
    np.testing.assert_allclose(np.log(on["income"] / off["income"]), wl.income_shift(e + 100, n + 100, 1.0, 0))
