"""One self-contained ``report.html`` per pipeline run (``<results>/cities/report.html``,
``<results>/ses/report.html``): every number read from the files the stages wrote, every image embedded
as a data URI, no script, style or picture fetched from the network, so the file opens offline.

Each stage refreshes its pipeline's page when it succeeds (``core.stage``); parts whose stage has not run
yet say so. The pipelines' pages are built by ``urbanlens.cities.report_html`` and
``urbanlens.ses.report_html`` (their ``render``, handed in here: core imports no pipeline); this module
holds what both use: the HTML pieces, the page with its load check, and the writer.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from .config import Config, results_dir
from .files import atomic_path

NAME = "report.html"
NOT_RUN = "not run yet"
# no absolute path, no time: the same results give the same page wherever they lie
INTRO = "<p>Every number below is read from the files in this report's folder.</p>"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image(path: Path, alt: str, width: int | None = None) -> str:
    """``<img>`` of the file at ``path``, embedded; a short note when the file is not there."""
    path = Path(path)
    if not path.is_file():
        return f'<p class="missing">{esc(path.name)}: {NOT_RUN}</p>'
    style = f' style="max-width:{width}px"' if width else ""
    return (f'<figure><img alt="{esc(alt)}" src="{data_uri(path.read_bytes(), _MIME.get(path.suffix.lower(), "image/png"))}"'
            f'{style}><figcaption>{esc(path.name)}</figcaption></figure>')


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def num(value, digits: int = 3) -> str:
    """A number as the report prints it; '-' for a missing or non-finite one."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-" if value is None else esc(value)
    return f"{v:.{digits}f}" if np.isfinite(v) else "-"


def interval(value, lo, hi, digits: int = 3) -> str:
    """``v [lo, hi]``; ``v`` alone when the bounds are missing."""
    text = num(value, digits)
    if lo is None or hi is None or num(lo) == "-" or num(hi) == "-":
        return text
    return f"{text} [{num(lo, digits)}, {num(hi, digits)}]"


def p_value(entry: dict | None) -> str:
    """``p = ...`` of a permutation entry, with the flag when it is not distinguishable from chance."""
    if not isinstance(entry, dict) or entry.get("p_value") is None:
        return "-"
    text = f"p = {entry['p_value']:.2g}"
    return flag(text + ": not distinguishable from chance") if entry.get("chance") else text


def flag(text: str) -> str:
    """A warning the reader must not miss (a note on too few units, a failed sanity check, chance)."""
    return f'<span class="flag">{esc(text)}</span>'


def table(frame: pd.DataFrame, digits: int = 3, max_rows: int = 60) -> str:
    """An HTML table of ``frame`` (numbers rounded to ``digits``); rows beyond ``max_rows`` are counted."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.head(max_rows).iterrows():
        cells = []
        for v in row:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
                cells.append(f"<td>{'' if v is None or (isinstance(v, float) and np.isnan(v)) else esc(v)}</td>")
            else:
                cells.append(f'<td class="n">{num(v, digits) if isinstance(v, (float, np.floating)) else esc(v)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>{len(frame) - max_rows} more rows in the file.</p>" if len(frame) > max_rows else ""
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>{more}'


def pairs(items: Iterable[tuple[str, str]]) -> str:
    """A two-column table of already formatted (name, value) pairs; values may hold markup."""
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in items) + "</table>"


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def not_run(what: str, how: str) -> str:
    """The body of a part whose stage has not run: ``<what>: not run yet (<how>)``."""
    return f'<p class="missing">{esc(what)}: {NOT_RUN} ({esc(how)}).</p>'


def guarded(build: Callable[..., str], *args) -> str:
    """``build(*args)``; a file a part cannot read shows as that part's error in the page, and the
    stage that refreshes the report is not failed by it."""
    try:
        return build(*args)
    except Exception as e:  # noqa: BLE001 - shown in the page, never hidden
        return f'<p class="flag">this part could not be built: {esc(type(e).__name__)}: {esc(e)}</p>'


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-top:8px}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
div.wide{overflow-x:auto}td.n{text-align:right;font-variant-numeric:tabular-nums}nav a{margin-right:10px}
figure{display:inline-block;margin:4px;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:11px;color:#666}.missing{color:#888;font-style:italic}.flag{color:#a40000;font-weight:600}
.map{display:flex;gap:12px;align-items:flex-start}.map svg{border:1px solid #ccc;background:#f4f4f4;max-width:800px;max-height:85vh;width:100%}
.map .info{min-width:260px;font-size:13px}.map path{stroke:#fff;stroke-width:0.5%}.map path.sel{stroke:#000}
"""

# Runs first: records every script error into #report-errors; on load, checks that every image decoded
# and says so on <body> (data-ok="1", data-images=N), which a headless browser test reads back.
_CHECK = """
window.reportErrors=[];
window.addEventListener('error',function(e){window.reportErrors.push(String(e.message||e));});
window.addEventListener('load',function(){
 var bad=[],imgs=document.images;
 for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0){bad.push(imgs[i].alt||('image '+i));}}
 var box=document.getElementById('report-errors');
 var all=window.reportErrors.concat(bad.map(function(b){return 'image not shown: '+b;}));
 box.textContent=all.join('\\n');
 document.body.setAttribute('data-images',String(imgs.length));
 document.body.setAttribute('data-ok',all.length?'0':'1');
});
"""


def page(title: str, intro: str, parts: list[tuple[str, str, str]], script: str = "") -> str:
    """The whole document: ``parts`` are (anchor, title, body); ``script`` is inline JavaScript."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in parts)
    body = "".join(section(t, b, a) for a, t, b in parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style><script>{_CHECK}</script></head><body>"
            f"<h1>{esc(title)}</h1>{intro}<nav>{nav}</nav>{body}"
            f'<pre id="report-errors" class="flag"></pre><script>{script}</script></body></html>')


def write(render: Callable[[Path], str], folder: Path, out: Path | None = None) -> Path:
    """``render(folder)`` (a pipeline's page of its results folder) written atomically to ``out`` (default
    ``<folder>/report.html``)."""
    out = Path(out) if out is not None else Path(folder) / NAME
    text = render(Path(folder))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return out


def refresh(cfg: Config, pipeline: str, render: Callable[[Path], str]) -> Path | None:
    """What every stage does last: rewrite ``<paths.results>/<pipeline>/report.html`` from what is there.
    Under torchrun only the first process writes it (None elsewhere)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    out = write(render, results_dir(cfg, pipeline))
    print(f"[report] {out}")
    return out


def figures(folder: Path, label: str, width: int = 560) -> str:
    """Every PNG of ``folder`` (sorted), embedded, captioned ``<label>: <file stem>``."""
    return "".join(image(fig, f"{label}: {fig.stem.replace('_', ' ')}", width) for fig in sorted(Path(folder).glob("*.png")))


def model_cards(folder: Path) -> str:
    """Links to the MODEL_CARD.md files in ``folder`` and one level below (relative, so the page keeps
    working wherever the folder is copied)."""
    cards = sorted([*Path(folder).glob("MODEL_CARD.md"), *Path(folder).glob("*/MODEL_CARD.md")])
    links = ", ".join(f'<a href="{esc(c.relative_to(folder).as_posix())}">{esc(c.relative_to(folder).as_posix())}</a>'
                      for c in cards)
    return f"<p>Model cards: {links}.</p>" if cards else ""


def pipeline_page(title: str, folder: Path, parts, script: str = "") -> str:
    """A pipeline's whole page: the intro with its model cards, then each part (anchor, title, build)
    built from ``folder`` (a part that fails says so instead of stopping the page)."""
    built = [(a, t, guarded(build, folder)) for a, t, build in parts]
    return page(title, INTRO + model_cards(folder), built, script)
