"""``python -m urbanlens.report cities|ses FOLDER [--out FILE]``: (re)write a results folder's report.html
(the stages do it themselves when they succeed; this is for a folder copied elsewhere or an older run)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .cities import report_html as cities_report
from .core.report_page import write
from .ses import report_html as ses_report

RENDERERS = {"cities": cities_report.render, "ses": ses_report.render}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", choices=sorted(RENDERERS))
    parser.add_argument("folder", type=Path, help="the pipeline's results folder, e.g. results/demo/cities")
    parser.add_argument("--out", type=Path, default=None, help="where to write it (default FOLDER/report.html)")
    args = parser.parse_args()
    print(write(RENDERERS[args.pipeline], args.folder, args.out))


if __name__ == "__main__":
    main()
