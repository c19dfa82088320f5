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
