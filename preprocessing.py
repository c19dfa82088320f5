"""Raw city images -> patches and a site-based train / val / test / test_b split.

Any raster rasterio reads (GeoTIFF, JPEG 2000, PNG, JPEG; 8/16-bit or float, 1 to many bands) is made
8-bit RGB first (config `image`: bands, and a 2-98 % stretch for data above 8 bits; see
urbanlens/cities/rasters.py), resampled to `cities.patch.ground_m` metres per pixel when that is set. Every site
but the last of a city trains the model; each image of the last site is cut into a left half (test) and
a right half (val), and each half is patched with `cities.patch.size` and `cities.patch.stride` (paper: 480 and 240,
361 patches per 4800 px image). Patches with more than `cities.patch.max_nodata` nodata, or of one colour, are
left out; a city left without train, val or test patches is left out. `test_b` is a fixed sample of
`cities.split.test_b_per_city` test patches per city. A re-run only writes what is missing.

    python preprocessing.py --config configs/cities_demo.yaml [--set cities.patch.stride=240]
"""
import time

from urbanlens.cities import cutting, patches, rasters, report_html
from urbanlens.cities.patches import SPLITS, patches_dir, plan_split, unused_inputs
from urbanlens.core import entry, locks, report_page, runs
from urbanlens.core.config import cli, data_dir
from urbanlens.core.errors import DataError
from urbanlens.core.files import save_run_config, write_csv

LAYOUT = "<City Name (IATA)>/<site>/<image> (.tif, .jp2, .png or .jpg), two or more sites per city"


def say(msg: str) -> None:
    print(f"[preprocessing] {msg}")


def main() -> None:
    cfg, _ = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml")
    t0 = time.time()
    raw = data_dir(cfg, "cities", "raw")
    out = patches_dir(cfg.paths.data)
    entry.keep(locks.hold(out, "preprocessing.py", cfg, elsewhere="paths.data"))  # one run at a time writes these patches
    opts = rasters.options(cfg)
    if not raw.is_dir() or not any(raw.iterdir()):
        raise DataError(raw, "no city images", f"place them as {raw}/{LAYOUT} (for a synthetic world: "
                        "bash data_setup.sh --synthetic cities with this config)")

    # 1. plan: which patch of which image goes to which split (test_b is drawn once blanks are out)
    plan, problems = plan_split(raw, cfg.cities.patch.size, cfg.cities.patch.stride, 0, cfg.seed, strict=cfg.strict,
                                ground_m=opts["ground_m"])
    for p in problems:
        say(f"skipped: {p}")
    for line in unused_inputs(raw):  # nothing under the raw folder is passed over without a word
        say(f"not used: {line}")
    if plan.empty:
        raise DataError(raw, "no usable city image (all skipped, see above)", "fix the files listed or lower cities.patch.size")

    # 2. cut: each source image converted once, in parallel; files already there are kept, unless they
    #    were cut with other settings or from a source image changed since
    sources = runs.fingerprint(cfg.paths.data, [raw / s for s in sorted(plan["source"].unique())])
    changed = patches.patch_changes(out, cfg, sources)
    if changed and not cfg.overwrite:
        runs.refuse(out, "holds patches cut with other settings", changed,
                    "use --set overwrite=true to cut them again, or another paths.data")
    if changed:
        patches.clear_patches(out)
        say(f"{out} held patches made with other settings: cut again")
    runs.write_stamp(out / patches.STAMP, "preprocessing.py", cfg, patches.RUN_KEYS, sources)
    result = cutting.cut(plan, raw, out, opts, cfg.cities.patch.max_nodata, cfg.cities.patch.jpeg_quality, cfg.workers)
    for source, problem in result.failed.items():
        if cfg.strict:
            raise DataError(f"{problem} (strict=true; --set strict=false lists and skips it)")
        say(f"skipped: {problem}")
    for iata, counts in cutting.left_out_counts(result, plan).items():
        say(f"{iata}: left out {sum(counts.values())} blank patches ("
            + ", ".join(f"{n} {why}" for why, n in counts.items())
            + f"; cities.patch.max_nodata={cfg.cities.patch.max_nodata})")
    plan = result.kept(plan)
    table = cutting.sources_frame(result.sources)

    # 3. cities: each needs train, val and test patches; all at the same ground resolution
    for city, lacking in patches.incomplete_cities(plan).items():
        msg = f"{raw / city}: no {'/'.join(lacking)} patches once blank ones are left out; city left out"
        if cfg.strict:
            raise DataError(f"{msg} (strict=true)")
        say(msg)
        plan = plan[plan["city"] != city]
    if plan.empty:
        raise DataError(raw, "no city has train, val and test patches (see above)", "fix the images listed")
    spread, per_city = patches.resolution_spread(table[table["iata"].isin(plan["iata"])])
    if opts["ground_m"] is None and spread > 1.5:
        say(f"cities' ground resolutions differ {spread:.1f}x ("
            + ", ".join(f"{c} {r:g} m/px" for c, r in sorted(per_city.items()))
            + "): their patches cover different ground; set cities.patch.ground_m (e.g. the coarsest) to resample")

    # 4. test_b, the manifest, and no file of an earlier split left behind
    plan = patches.add_test_b(plan, cfg.cities.split.test_b_per_city, cfg.seed)
    short = plan[plan["split"] == "test_b"].groupby("iata").size()
    for iata, n in short[short < cfg.cities.split.test_b_per_city].items():
        say(f"{iata}: {n} test_b patches, fewer than cities.split.test_b_per_city={cfg.cities.split.test_b_per_city} "
            "(all its test patches)")
    linked = cutting.link_test_b(plan, out)
    write_csv(plan, out / "manifest.csv")
    write_csv(table, out / patches.SOURCES)
    removed = patches.prune(out, plan)
    save_run_config(cfg, out)

    counts = plan["split"].value_counts()
    say(f"{plan['iata'].nunique()} cities; " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
        + f" patches ({result.written + linked} written now"
        + (f", {removed} no longer used removed" if removed else "")
        + f") in {out}; per image: {out / patches.SOURCES} ({time.time() - t0:.1f} s)")
    report_page.refresh(cfg, "cities", report_html.render)


if __name__ == "__main__":
    entry.run(main)
