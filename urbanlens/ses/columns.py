"""What the readers of the real products share: column spellings matched in any letter case, and
vector files that GDAL cannot open reported as one line naming the file and the fix."""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import pyogrio.errors

from ..core.errors import DataError


def column_key(name: str) -> str:
    """Comparison key of a column name: lower case, no underscores."""
    return name.lower().replace("_", "")


def pick_columns(fields: Sequence[str], wanted: Mapping[str, Sequence[str]], path, what: str,
                  source: str = "the provider's") -> dict[str, str]:
    """Map each wanted name to the file's column among its accepted spellings (any case)."""
    by_key = {column_key(f): f for f in fields}
    found, missing = {}, []
    for out, spellings in wanted.items():
        hit = next((by_key[column_key(s)] for s in spellings if column_key(s) in by_key), None)
        if hit is None:
            missing.append(f"{out} (one of {', '.join(spellings)})")
        else:
            found[out] = hit
    if missing:
        raise DataError(path, f"{what} lacks columns: {'; '.join(missing)}",
                        f"columns present are {', '.join(fields)}; rename them or use {source} original file")
    return found


@contextlib.contextmanager
def opening(path, what: str, fix: str):
    """Reads inside turn a file GDAL cannot open or read (not a vector file, truncated, damaged) into a
    DataError naming ``path``, ``what`` it should be and the ``fix``."""
    try:
        yield
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, pyogrio.errors.FieldError) as e:
        reason = str(e).split(";")[0].replace(f"'{path}' ", "").replace(str(path), "").strip(" .:")
        raise DataError(path, f"not a readable {what} ({reason})", fix) from None
