"""Run stamps: the settings and input fingerprints a stage's outputs were made from, and the one answer
to "same run or not"."""
import json
import os
import pathlib

import pandas as pd
import pytest

from urbanlens.core import errors, files, runs
from urbanlens.core.config import load_config

KEYS = ("seed", "cities.patch", "cities.train.lr")


def _inputs(tmp_path, names=("a.jpg", "b.jpg")):
    for name in names:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        if not (tmp_path / "data" / name).exists():
            (tmp_path / "data" / name).write_bytes(name.encode() * 10)
    return runs.fingerprint(tmp_path / "data", runs.files_under(tmp_path / "data", "."))


def test_same_settings_and_inputs_are_the_same_run(tmp_path):
    cfg = load_config(None, ["seed=3"])
    inputs = _inputs(tmp_path)
    stamp = runs.write_stamp(tmp_path / "s.stamp.json", "stage.py", cfg, KEYS, inputs)
    assert runs.compare(stamp, cfg, KEYS, inputs) == []
    # values outside the keys (workers, device, other sections) do not make another run
    other = load_config(None, ["seed=3", "workers=5", "device=cpu", "cities.test.batch_size=2"])
    assert runs.compare(stamp, other, KEYS, _inputs(tmp_path)) == []
    saved = files.read_json(stamp)
    assert saved["stage"] == "stage.py" and saved["settings"]["cities.patch.size"] == cfg.cities.patch.size
    assert set(saved["inputs"]) == {"a.jpg", "b.jpg"}


def test_changed_keys_are_named_in_key_order(tmp_path):
    stamp = runs.write_stamp(tmp_path / "s.stamp.json", "stage.py", load_config(None), KEYS)
    other = load_config(None, ["cities.train.lr=0.5", "cities.patch.stride=7", "seed=9"])
    assert runs.compare(stamp, other, KEYS) == ["seed", "cities.patch.stride", "cities.train.lr"]
    extra = runs.write_stamp(tmp_path / "e.stamp.json", "stage.py", load_config(None), KEYS, extra={"version": 1})
    assert runs.compare(extra, load_config(None), KEYS, extra={"version": 2}) == ["version"]


def test_added_removed_and_modified_inputs_are_named(tmp_path):
    cfg = load_config(None)
    stamp = runs.write_stamp(tmp_path / "s.stamp.json", "stage.py", cfg, KEYS, _inputs(tmp_path))
    (tmp_path / "data" / "a.jpg").write_bytes(b"other content, same kind of file")
    (tmp_path / "data" / "b.jpg").unlink()
    now = _inputs(tmp_path, names=("a.jpg", "sub/c.jpg"))
    assert runs.compare(stamp, cfg, KEYS, now) == ["input a.jpg modified", "input b.jpg removed",
                                                   "input sub/c.jpg added"]
    assert runs.compare(stamp, cfg, KEYS, now, kinds=("modified",)) == ["input a.jpg modified"]


def test_a_copy_with_a_new_time_is_the_same_small_file_but_a_big_one_is_not(tmp_path):
    cfg = load_config(None)
    inputs = _inputs(tmp_path)
    stamp = runs.write_stamp(tmp_path / "s.stamp.json", "stage.py", cfg, KEYS, inputs)
    big = runs.fingerprint(tmp_path / "data", ["a.jpg"], hash_up_to=0)
    runs.write_stamp(tmp_path / "big.stamp.json", "stage.py", cfg, KEYS, big)
    t = os.stat(tmp_path / "data" / "a.jpg").st_mtime_ns
    os.utime(tmp_path / "data" / "a.jpg", ns=(t + 10**9, t + 10**9))
    assert runs.compare(stamp, cfg, KEYS, _inputs(tmp_path)) == []     # same content hash
    now = runs.fingerprint(tmp_path / "data", ["a.jpg"], hash_up_to=0)
    assert runs.compare(tmp_path / "big.stamp.json", cfg, KEYS, now) == ["input a.jpg modified"]


def test_table_fingerprint_follows_the_values():
    a = pd.DataFrame({"cell_id": ["x", "y"], "income": [1.5, 2.0]})
    assert runs.table_fingerprint("t", a) == runs.table_fingerprint("t", a.copy())
    assert runs.table_fingerprint("t", a) != runs.table_fingerprint("t", a.assign(income=[1.5, 2.1]))


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"stage": "x"}', b"\xff\xfe"])
def test_a_damaged_stamp_is_unknown_and_read_stamp_names_file_and_stage(tmp_path, body):
    path = tmp_path / "s.stamp.json"
    path.write_bytes(body)
    changes = runs.compare(path, load_config(None), KEYS)
    assert len(changes) == 1 and changes[0].startswith("unknown") and "s.stamp.json" in changes[0]
    with pytest.raises(errors.StaleRun, match=r"s\.stamp\.json.*damaged.*re-run stage\.py"):
        runs.read_stamp(path, "stage.py")


def test_a_missing_stamp_is_unknown(tmp_path):
    assert runs.compare(tmp_path / "none.stamp.json", load_config(None), KEYS) == ["unknown: no none.stamp.json"]
    with pytest.raises(FileNotFoundError):
        runs.read_stamp(tmp_path / "none.stamp.json")


def test_a_failed_write_leaves_the_old_stamp_whole(tmp_path, monkeypatch):
    cfg = load_config(None)
    path = runs.write_stamp(tmp_path / "s.stamp.json", "stage.py", cfg, KEYS)
    before = path.read_bytes()

    def half_then_fail(self, text, *args, **kwargs):  # the disk fills up halfway through the write
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        runs.write_stamp(path, "stage.py", load_config(None, ["seed=2"]), KEYS)
    monkeypatch.undo()
    assert path.read_bytes() == before and json.loads(before)["settings"]["seed"] == cfg.seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.stamp.json"]  # no temporary file left


def test_refuse_is_one_line_naming_change_and_way_out(tmp_path):
    changes = [f"input f{i}.jpg modified" for i in range(9)]
    with pytest.raises(errors.StaleRun) as e:
        runs.refuse(tmp_path, "holds patches cut with other settings", ["cities.patch.size", *changes],
                    "use --set overwrite=true")
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{tmp_path}: holds patches")
    assert "cities.patch.size" in text and "and 6 more" in text and text.endswith("; use --set overwrite=true")


def test_stamps_of_the_same_run_are_byte_identical(tmp_path):
    cfg = load_config(None)
    a = runs.write_stamp(tmp_path / "a.json", "stage.py", cfg, KEYS, _inputs(tmp_path))
    b = runs.write_stamp(tmp_path / "b.json", "stage.py", load_config(None), KEYS, _inputs(tmp_path))
    assert a.read_bytes() == b.read_bytes()
