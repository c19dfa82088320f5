"""Suite-wide settings: no test, nor any script a test starts, downloads anything. And the small cities
world with its trained classifier, built once per test run and shared by the test files (and by the
pytest-xdist workers) that need one."""
import os

import pytest
from filelock import FileLock
from script_runner import run_cities_stage

os.environ["URBANLENS_OFFLINE"] = "1"  # tests that serve weights locally lift it for themselves


@pytest.fixture(scope="session")
def cities_world(tmp_path_factory):
    """``root`` holding ``data/`` (the world of tests/conf/cities_small.yaml, cut into patches) and
    ``results/cities`` (a classifier trained and tested on it). Read it; write only into other folders
    (another ``results=``, or folders of the test's own)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' temporary folders share this run's parent
        shared = shared.parent
    root = shared / "cities_world"
    with FileLock(str(shared / "cities_world.lock")):
        if not (root / "built").is_file():
            for stage in (["-m", "urbanlens.cities.world"], ["preprocessing.py"], ["train_classification.py"],
                          ["test_classification.py"]):
                run_cities_stage(stage, root)
            (root / "built").touch()
    return root


# The longest test files, longest first (seconds of one worker on 2 cores, measured): run first, so that the
# workers end together instead of one running a long end-to-end file alone at the end. run.sh test passes
# --no-loadscope-reorder, which keeps this order (pytest-xdist otherwise puts files with many tests first).
LONGEST_FIRST = (
    "tests/e2e/test_e2e_cities.py",               # ~300 s, builds the shared cities world
    "tests/e2e/test_structure_demo.py",           # ~150 s, the SES demo's setting on one city
    "tests/e2e/test_structure_off.py",            # ~150 s
    "tests/e2e/test_e2e_ses.py",                  # ~140 s
    "tests/reliability/test_bad_input.py",        # ~145 s
    "tests/e2e/test_reproducible.py",             # ~100 s
    "tests/reliability/test_interrupt.py",        # ~90 s
    "tests/e2e/test_e2e_backbones.py",            # ~80 s
    "tests/reliability/test_sharding.py",         # ~70 s
    "tests/e2e/test_leakage.py",                  # ~70 s
    "tests/e2e/test_negative_control.py",         # ~55 s
    "tests/reliability/test_ddp_equals_single.py",  # ~50 s
    "tests/reliability/test_gpu_check.py",        # ~50 s
)


def pytest_collection_modifyitems(config, items):
    """The files of LONGEST_FIRST first, in that order; every other file after them, as collected (a stable
    sort: each file's tests stay together and in their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
