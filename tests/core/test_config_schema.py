"""The config schema, tested from itself: for every key of defaults.yaml, a wrong value of each kind that
applies to it (wrong type, null, inf/nan, out of range, unknown choice, a bad list) is a one-line
ConfigError naming the key; values at the edges of its range and each of its choices load. A key added to
defaults.yaml is covered without a new test, and one without a schema entry fails here."""
import ast
import os
from pathlib import Path

import pytest
import yaml

from urbanlens.core import schema
from urbanlens.core.config import DEFAULTS, ConfigError, load_config
from script_runner import python, run

ROOT = Path(__file__).resolve().parents[2]


def leaves(d, prefix=""):
    for k, v in d.items():
        yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


DEFAULT_VALUES = dict(leaves(yaml.safe_load(DEFAULTS.read_text())))
WRONG_TYPE = {bool: ["maybe", "1"], int: ["many", "2.5"], float: ["many", "[1]"], str: ["[a, b]", "{a: 1}"],
              list: ["5", "Paris"]}
BAD_LISTS = {"names": ["[]", "[Paris, Paris]", "[Lyon, Paris, Lyon]", "['']", "[3]"],
             "bands": ["[]", "[0]", "[1, 2]", "[1, 2, 3, 4]", "[a]", "[true]", "[1.5]"]}


def _yaml(x):
    return yaml.safe_dump(x, default_flow_style=True).strip().removesuffix("...").strip()


def outside(spec):
    """Values just outside the range of ``spec`` (the bound itself where it is open)."""
    step = 1 if spec.type is int else 0.5
    out = []
    if spec.lo is not None:
        out.append(spec.lo if spec.lo_open else spec.lo - step)
    if spec.hi is not None:
        out.append(spec.hi if spec.hi_open else spec.hi + step)
    return [spec.type(v) for v in out]


def wrong_values(key, spec):
    """(kind, YAML text) of every kind of wrong value that applies to ``spec``."""
    out = [("type", t) for t in WRONG_TYPE[spec.type]]
    if not spec.nullable:
        out.append(("null", "null"))
    if spec.type is float:
        out += [("finite", t) for t in (".inf", "-.inf", ".nan", "inf", "-inf", "nan", "Infinity")]
    out += [("range", _yaml(v)) for v in outside(spec)]
    if spec.choices:
        out += [("choice", "no_such_choice"), ("choice", spec.choices[0].upper() + "x")]
        out += [("choice", c.replace(":N", ":x")) for c in spec.choices if c.endswith(":N")]
    if spec.type is str and not spec.choices and not spec.empty:
        out.append(("empty", "''"))
    out += [("list", t) for t in BAD_LISTS.get(spec.items, [])]
    return out


CASES = [(key, kind, text) for key, spec in schema.SCHEMA.items() for kind, text in wrong_values(key, spec)]


def test_every_key_of_the_defaults_has_a_schema_entry_and_satisfies_it():
    assert sorted(DEFAULT_VALUES) == sorted(schema.SCHEMA)
    for key, value in DEFAULT_VALUES.items():
        spec = schema.SCHEMA[key]
        assert value is None if spec.nullable else type(value) is spec.type, key  # loading keeps its type
        assert spec.type is bool or spec.choices or spec.type in (str, list) or spec.range_words or spec.nullable, \
            f"{key}: a number without a range"
    assert len(CASES) > 3 * len(schema.SCHEMA)  # several wrong values a key


@pytest.mark.parametrize("key, kind, text", CASES, ids=[f"{k}={t}" for k, _, t in CASES])
def test_a_wrong_value_of_each_kind_names_the_key(key, kind, text):
    spec = schema.SCHEMA[key]
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={text}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--set {key}={text}: '{key}' must be ")
    if spec.choices:
        assert ", ".join(spec.choices) in msg
    else:
        assert {"null": "not null", "finite": "finite number", "range": spec.range_words,
                "empty": "non-empty"}.get(kind, "got") in msg


def test_the_edges_of_each_range_and_each_choice_load():
    for key, spec in schema.SCHEMA.items():
        edges = [v for v, open_ in ((spec.lo, spec.lo_open), (spec.hi, spec.hi_open)) if v is not None and not open_]
        for value in [spec.type(v) for v in edges] + [c.replace(":N", ":1") for c in spec.choices]:
            sets = [f"{key}={_yaml(value)}"]
            if key in ("ses.cams.poor_class", "ses.cams.rich_class"):  # the pair must differ (schema.check_pairs)
                sets.append(f"{'ses.cams.rich_class' if key == 'ses.cams.poor_class' else 'ses.cams.poor_class'}={3 if value == 2 else 2}")
            got = load_config(None, sets)
            for part in key.split("."):
                got = got[part]
            assert got == value and type(got) is type(value), key
        if spec.nullable:
            load_config(None, [f"{key}=null"])
    assert load_config(None, ["cities.image.bands=[3, 2, 1]", "cities.image.scale_min=0", "cities.train.lr=1e-4"]).cities.train.lr == 1e-4


def test_wrong_values_from_a_file_name_the_file(tmp_path):
    for key, text in [("cities.train.lr", ".nan"), ("ses.cities", "[Paris, Lyon, Paris]"), ("cities.saliency.method", "cam"),
                      ("cities.model.epochs_typo", "3")]:
        *sections, leaf = key.split(".")
        p = tmp_path / "c.yaml"
        p.write_text("".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {text}\n")
        with pytest.raises(ConfigError, match=f"^{p}: .*'{key}'"):
            load_config(p)
    with pytest.raises(ConfigError, match="'Paris' is listed twice"):
        load_config(None, ["ses.world.cities=[Paris, Lyon, Paris]"])


CHOICE_LISTS = ("AMP_CHOICES", "DEVICES", "BACKBONES", "SCHEDULES", "CAM_METHODS", "SPLITS", "SCALES",
                "ORTHO_PRODUCTS", "IMPUTED_POLICIES", "CV_SCHEMES")


def test_the_code_keeps_no_copy_of_a_choice_list():
    """A tuple, list or set of strings equal to one of the schema's choice lists anywhere else in the package
    or the scripts is a copy that can drift from what the config allows (they import it from schema)."""
    lists = {name: set(getattr(schema, name)) for name in CHOICE_LISTS}
    files = [p for p in (ROOT / "urbanlens").rglob("*.py") if p.name != "schema.py"] + sorted(ROOT.glob("*.py"))
    copies = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                copies += [f"{path.name}:{node.lineno} {name}" for name, values in lists.items()
                           if {e.value for e in node.elts} == values]
    assert copies == []
    tiles = ast.parse((ROOT / "urbanlens/ses/tiles.py").read_text())  # IGN's spellings of each product
    spellings = next(ast.literal_eval(n.value) for n in tiles.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "ORTHO_PRODUCTS")
    assert tuple(spellings) == schema.ORTHO_PRODUCTS


@pytest.mark.parametrize("override", ["cities.train.lr=[1,", "a=: b", "ses.cities=[Paris, Lyon", "cities.train.epochs={3",
                                      'paths.data="unclosed', "seed=*x"])
def test_malformed_yaml_in_set_names_the_override(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"--set {override}: the value is not valid YAML") and "\n" not in str(e.value)


def test_config_files_that_cannot_be_used(tmp_path, monkeypatch):
    cases = {"folder": (tmp_path / "adir", "is a folder"), "empty": (tmp_path / "empty.yaml", "empty"),
             "comments": (tmp_path / "comments.yaml", "empty"), "latin1": (tmp_path / "latin1.yaml", "not UTF-8"),
             "twice": (tmp_path / "twice.yaml", "'train' written twice, line 4")}
    cases["folder"][0].mkdir()
    cases["empty"][0].write_text("")
    cases["comments"][0].write_text("# nothing set\n")
    cases["latin1"][0].write_bytes("ses: {cities: [Orl\xe9ans]}\n".encode("latin-1"))
    cases["twice"][0].write_text("cities:\n  train: {epochs: 3}\n  model: {input_size: 64}\n  train: {lr: 0.01}\n")
    for path, words in cases.values():
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value).startswith(f"{path}: ") and words in str(e.value) and "\n" not in str(e.value)
    locked = tmp_path / "locked.yaml"
    locked.write_text("seed: 1\n")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse it the way the OS refuses other users
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=f"^{locked}: cannot be read \\(Permission denied\\); check its permissions"):
        load_config(locked)


def test_a_script_prints_one_error_line_and_exits_2():
    r = run(python("preprocessing.py", "--config", "configs/cities_demo.yaml", "--set", "cities.train.lr=.nan"),
            env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set cities.train.lr=.nan: 'cities.train.lr' must be a finite number")
