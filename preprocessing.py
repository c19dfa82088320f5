"""Raw city images -> patches and a site-based train / val / test / test_b split.

Every site but the last of a city trains the model; each image of the last site is cut into a left
half (test) and a right half (val), and each half is patched with `patch.size` and `patch.stride`
(paper: 480 and 240, 361 patches per 4800 px image). `test_b` is a fixed sample of
`split.test_b_per_city` test patches per city. A re-run only writes what is missing.

    python preprocessing.py --config configs/cities_demo.yaml [--set patch.stride=240]
"""
import time

from urbanlens.cities import patches
from urbanlens.cities.patches import SPLITS, patches_dir, plan_split, write_patches
from urbanlens.core import entry, runs
from urbanlens.core.config import cli, data_dir
from urbanlens.core.errors import DataError
from urbanlens.core.files import save_run_config, write_csv


def main() -> None:
    cfg, _ = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml")
    t0 = time.time()
    raw = data_dir(cfg, "cities", "raw")
    out = patches_dir(cfg.paths.data)
    if not raw.is_dir() or not any(raw.iterdir()):
        raise DataError(f"{raw}: no city images; run 'bash data_setup.sh --synthetic cities' "
                 "or place them as <City Name (IATA)>/<site>/<image>.jpg")

    # 1. plan: which patch of which image goes to which split
    plan, problems = plan_split(raw, cfg.patch.size, cfg.patch.stride, cfg.split.test_b_per_city,
                                cfg.seed, strict=cfg.strict)
    for p in problems:
        print(f"[preprocessing] skipped: {p}")
    if plan.empty:
        raise DataError(f"{raw}: no usable city image (all skipped, see above); fix the files listed "
                 "or lower patch.size")

    # 2. cut: patches of each source image, in parallel; files already there are kept, unless they were
    #    cut with other settings or from a source image changed since
    sources = runs.fingerprint(cfg.paths.data, [raw / s for s in sorted(plan["source"].unique())])
    changed = patches.patch_changes(out, cfg, sources)
    if changed and not cfg.overwrite:
        runs.refuse(out, "holds patches cut with other settings", changed,
                    "use --set overwrite=true to cut them again, or another paths.data")
    if changed:
        patches.clear_patches(out)
        print(f"[preprocessing] {out} held patches made with other settings: cut again")
    runs.write_stamp(out / patches.STAMP, "preprocessing.py", cfg, patches.RUN_KEYS, sources)
    failed = {}
    written = write_patches(plan, raw, out, cfg.patch.jpeg_quality, cfg.workers, failed=failed)
    for source, problem in failed.items():
        if cfg.strict:
            raise DataError(f"{problem} (strict=true; --set strict=false lists and skips it)")
        print(f"[preprocessing] skipped: {problem}")
    plan = plan[~plan["source"].isin(failed)]
    write_csv(plan, out / "manifest.csv")
    save_run_config(cfg, out)

    counts = plan["split"].value_counts()
    print(f"[preprocessing] {plan['iata'].nunique()} cities; "
          + ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
          + f" patches ({written} written now) in {out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    entry.run(main)
