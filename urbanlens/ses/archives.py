"""Providers' archives as they are delivered: zips holding zips (Copernicus Urban Atlas) or a 7z
(INSEE Filosofi), unpacked with Python only (zipfile, py7zr), never by a system 7z.

    python -m urbanlens.ses.archives <Filosofi...zip> <folder> [expected file name]

unpacks INSEE's zip -> .7z -> GeoPackages into the folder (what data_setup.sh runs); a failure is one
``error:`` line and a non-zero exit.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from ..core.errors import DataError

UNPACKED_SUFFIX = ".unpacked"   # cache folder beside an archive: <archive name>.unpacked/


def cache_dir(archive: str | Path) -> Path:
    """The folder beside ``archive`` where its members are unpacked once."""
    archive = Path(archive)
    return archive.with_name(archive.name + UNPACKED_SUFFIX)


def _stamp(archive: Path) -> dict:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recorded(stamp_file: Path) -> dict | None:
    """What an unpacked folder's stamp records; None when absent or damaged (then it is unpacked again)."""
    try:
        return json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return None


def _zip_names(archive: Path) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(archive, f"not a readable zip ({e})", "download it again") from None


def zip_members(archive: str | Path) -> list[str]:
    """The member names of a zip (folders included as they are listed); DataError when unreadable."""
    return _zip_names(Path(archive))


def unpack_inner_zip(archive: str | Path, member: str) -> Path:
    """The contents of the zip ``member`` of the zip ``archive`` (a zip inside a zip), unpacked into
    ``<archive>.unpacked/<member stem>/`` and returned. Done once: a later call finds the folder and its
    stamp (the outer archive's size and time) and reuses it; a changed archive is unpacked again. The
    folder appears complete or not at all (unpacked under a temporary name, then renamed)."""
    archive = Path(archive)
    target = cache_dir(archive) / Path(member).stem
    stamp_file = target / ".unpacked.json"
    if _recorded(stamp_file) == {**_stamp(archive), "member": member}:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as outer:
            inner_path = Path(outer.extract(member, work / "_inner"))
        with zipfile.ZipFile(inner_path) as inner:
            inner.extractall(work / "content")
        (work / "content" / ".unpacked.json").write_text(json.dumps({**_stamp(archive), "member": member}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work / "content", target)
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise DataError(archive, f"cannot unpack {member} ({e})", "download the archive again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _seven_zip_errors() -> tuple:
    from py7zr import exceptions as x

    return (x.ArchiveError, x.Bad7zFile, x.CrcError, x.DecompressionError, x.AbsolutePathError,
            x.UnsupportedCompressionMethodError, x.PasswordRequired)


def unpack_census(archive: str | Path, dest: str | Path, expected: str | None = None) -> list[Path]:
    """INSEE's ``Filosofi..._gpkg.zip`` (a zip holding one ``.7z`` holding ``carreaux_200m_*.gpkg``):
    every GeoPackage and shapefile part inside, at any depth, moved flat into ``dest``; returns them.

    Also takes a ``.7z`` directly. DataError when an archive is unreadable, holds no 7z or no grid, or
    ``expected`` (a file name) is not among what it holds.
    """
    import py7zr

    _SEVEN_ZIP_ERRORS = _seven_zip_errors()
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(archive, "archive not found", "download it again (see data_setup.sh)")
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".census.tmp-", dir=dest))
    try:
        if archive.suffix.lower() == ".7z":
            sevens = [archive]
        else:
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".7z")]
                if not names:
                    raise DataError(archive, f"holds no .7z (found: {', '.join(z.namelist()[:8]) or 'nothing'})",
                                    "download INSEE's Filosofi 200 m GeoPackage zip again")
                sevens = [Path(z.extract(n, work / "zip")) for n in names]
        for seven in sevens:
            with py7zr.SevenZipFile(seven, mode="r") as sz:
                sz.extractall(path=work / "grid")
        found = sorted(p for p in (work / "grid").rglob("*")
                       if p.is_file() and p.suffix.lower() in (".gpkg", ".shp", ".shx", ".dbf", ".prj", ".cpg"))
        if not found:
            inside = sorted(p.name for p in (work / "grid").rglob("*") if p.is_file())
            raise DataError(archive, f"its 7z holds no GeoPackage or shapefile (found: "
                            f"{', '.join(inside[:8]) or 'nothing'})", "download INSEE's GeoPackage edition")
        if expected and expected not in {p.name for p in found}:
            raise DataError(archive, f"holds no {expected} (found: {', '.join(p.name for p in found)})",
                            "set ses.census_file to one of those")
        out = []
        for p in found:
            os.replace(p, dest / p.name)
            out.append(dest / p.name)
        return out
    except (zipfile.BadZipFile, OSError, EOFError, *_SEVEN_ZIP_ERRORS) as e:
        raise DataError(archive, f"cannot unpack ({type(e).__name__}: {e})",
                        "the download may be incomplete: delete it and run data_setup.sh again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        raise DataError("usage", "python -m urbanlens.ses.archives <archive.zip|.7z> <folder> [expected name]")
    out = unpack_census(args[0], args[1], args[2] if len(args) == 3 else None)
    print(f"unpacked {', '.join(p.name for p in out if p.suffix.lower() in ('.gpkg', '.shp'))} into {args[1]}")


if __name__ == "__main__":
    from ..core.entry import run

    run(main)
