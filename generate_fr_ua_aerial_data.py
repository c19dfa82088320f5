"""Census cells x Urban Atlas x orthophotos -> one image per 200 m cell and the cell index.

    python generate_fr_ua_aerial_data.py --config configs/ses_demo.yaml [--set k=v ...]

For each city of ``ses.cities``: the INSEE cells whose centre lies inside the city's Urban Atlas
boundary, with income ``ind_snv / ind`` (cells without income dropped); the orthophoto tiles each cell
overlaps (tile index reprojected to EPSG:3035); each cell read from its tile(s), reprojected to
EPSG:3035 on the fly, saved as ``FR_URBANATLAS_200m_<cell id>.png`` under
``<paths.results>/ses/imagery/<City>/``. A cell with more than ``ses.max_nodata`` nodata pixels is void
(kept on disk, flagged ``non_void = False``). Tiles are those of ``ses.ortho_product`` (RVB; IRC
images go to ``imagery-IRC/``); cells INSEE imputed (``i_est_200 = 1``) are kept or dropped by
``ses.imputed``. Writes ``<paths.results>/ses/cells.gpkg`` (layer ``cells``, with ``imputed``,
``imputed_policy`` and ``ortho_product`` columns). Re-runs skip the images already written.

Many machines: ``--shard I/N`` (numbered from 1) extracts only the I-th of N contiguous chunks of each
city's cells (in cell-id order) and writes the partial index ``cells.shard-I-of-N.gpkg``; once all N
are done, ``--merge N`` checks them and writes ``cells.gpkg`` exactly as an unsharded run does.

    python generate_fr_ua_aerial_data.py --config F --shard $SLURM_ARRAY_TASK_ID/8   (8 jobs)
    python generate_fr_ua_aerial_data.py --config F --merge 8                         (then once)
"""
import time

import geopandas as gpd
import pandas as pd

from urbanlens.core import entry, gis_style, locks, outputs, runs, shards
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.errors import DataError
from urbanlens.core.files import atomic_path, save_run_config, write_json
from urbanlens.ses import census as ses_census
from urbanlens.ses import extraction, urban_atlas
from urbanlens.ses import grid as ses_grid
from urbanlens.ses import tiles as ses_tiles


def main() -> None:
    cfg, args = cli(__doc__.splitlines()[0], "configs/ses_demo.yaml", extra=shards.add_shard_args)
    start = time.time()
    out = results_dir(cfg, "ses")
    index_path = out / "cells.gpkg"
    entry.keep(locks.hold(out, "generate_fr_ua_aerial_data.py", cfg))  # shared by the --shard jobs of one run

    # A results folder extracted from other data or at another size is not mixed with this run.
    stamp, inputs = out / extraction.STAMP, extraction.run_inputs(cfg)
    changed = runs.compare(stamp, cfg, extraction.RUN_KEYS, inputs) if runs.has_outputs(out, [stamp.name]) else []
    if changed and (not cfg.overwrite or args.shard):
        runs.refuse(out, "holds cells extracted with other settings", changed,
                    f"delete {out} before sharded runs" if cfg.overwrite else
                    "use another paths.results or --set overwrite=true")
    if changed:  # overwrite=true: no cell image of the other run is kept
        extraction.clear_cells(out)
    runs.write_stamp(stamp, "generate_fr_ua_aerial_data.py", cfg, extraction.RUN_KEYS, inputs)
    if cfg.ses.cell_size_m != 200:
        raise DataError(f"config: ses.cell_size_m={cfg.ses.cell_size_m}; the INSEE grid cells are 200 m")
    # --merge N: every shard's partial index must be there before anything is read
    parts = shards.shard_paths(index_path, args.merge) if args.merge else []

    # 1. orthophoto tile index (EPSG:2154)
    product = cfg.ses.ortho_product  # RVB, or IRC on purpose: a cell is never read from both
    tiles = ses_tiles.read_tile_index(data_dir(cfg, cfg.ses.aerial_dir), product=product)
    print(f"[extract] {len(tiles)} {product} orthophoto tiles indexed"
          + (f" ({tiles.attrs['missing']} listed but absent on disk, e.g. {tiles.attrs['missing_names'][0]})"
             if tiles.attrs["missing"] else "")
          + (f"; {tiles.attrs['other_product']} tiles of the other product ignored (ses.ortho_product={product})"
             if tiles.attrs["other_product"] else ""))
    print(f"[extract] tile index(es): {', '.join(tiles.attrs['indexes'])}" + (
        f"; {len(tiles.attrs['unlisted'])} raster file(s) named in no index, not used (e.g. "
        f"{tiles.attrs['unlisted'][0]})" if tiles.attrs["unlisted"] else ""))
    imagery = "imagery" if product == "RVB" else f"imagery-{product}"

    # 2. per city: cells inside the Urban Atlas boundary, with income, and the tiles they overlap
    frames, imputed_count, taken, counts = [], {"keep": 0, "drop": 0}, set(), {}
    census_path, census_note = ses_census.find_census(data_dir(cfg, cfg.ses.census_file))
    print(f"[extract] {census_note}")
    used = {"census": str(census_path), "tile_indexes": tiles.attrs.get("indexes", []), "urban_atlas": {}}
    for city in cfg.ses.cities:
        boundary = urban_atlas.read_ua_boundary(data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary)
        print(f"[extract] {urban_atlas.describe(city, boundary)}")
        used["urban_atlas"][city] = urban_atlas.sources(boundary)
        census = ses_census.read_census(census_path, bbox=boundary.total_bounds)
        cells, n_taken = extraction.drop_taken(extraction.cells_in_boundary(census, boundary), taken)
        taken.update(cells["cell_id"])  # a cell inside two overlapping boundaries: the first city's only
        cells, n_imputed = ses_census.apply_imputed(cells, cfg.ses.imputed)  # INSEE's i_est_200 = 1
        cells = extraction.sample_cells(cells, cfg.ses.max_cells, cfg.seed).copy()
        cells["city"], cells["ortho_product"], cells["imputed_policy"] = city, product, cfg.ses.imputed
        cells["path"] = [f"{imagery}/{city}/{extraction.cell_filename(c)}" for c in cells["cell_id"]]
        cells["tiles"] = ses_tiles.tiles_for_cells(cells, tiles)
        imputed_count[cfg.ses.imputed] += n_imputed
        counts[city] = {"without_income": census.attrs["dropped"], "malformed_ids": len(census.attrs["malformed"]),
                        "duplicate_rows": census.attrs["duplicates"], "in_an_earlier_city": n_taken}
        print(f"[extract] {city}: {len(cells)} cells inside the Urban Atlas boundary "
              f"({census.attrs['dropped']} census cells without income dropped, {n_imputed} imputed by INSEE "
              f"{'kept' if cfg.ses.imputed == 'keep' else 'dropped'}, "
              f"{int((cells['tiles'].str.len() == 0).sum())} cells outside every tile"
              + extraction.census_drops(census.attrs, n_taken) + ")")
        frames.append(cells)
    cells = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=ses_grid.LAEA)
    # the file or layer used for each role, beside the settings (not compared: the inputs' fingerprint is)
    runs.write_stamp(stamp, "generate_fr_ua_aerial_data.py", cfg, extraction.RUN_KEYS, inputs, extra={"used": used})
    tag = "extract"
    if args.shard:  # this job's share: a contiguous chunk of each city's cells in cell-id order
        i, n = args.shard
        cells = cells.iloc[shards.shard_positions(cells["cell_id"], cells["city"], i, n)].copy()
        index_path, tag = shards.shard_path(index_path, i, n), f"extract {i}/{n}"

    if args.merge:  # 3'. the N shards' partial indexes, checked and put in the order of an unsharded run
        partial = [outputs.read_gpkg(p, "cells", "generate_fr_ua_aerial_data.py --shard") for p in parts]
        index = shards.merge_in_order(partial, cells["cell_id"],
                                      names=[p.name for p in parts])
        cells = gpd.GeoDataFrame(index, geometry="geometry", crs=ses_grid.LAEA)
        status = pd.DataFrame({"extracted": [False] * len(cells)})
    else:  # 3. read every cell from its tile(s), reprojected to EPSG:3035, and save it (resumable)
        known = {}
        if index_path.is_file():
            old = outputs.read_gpkg(index_path, "cells", "generate_fr_ua_aerial_data.py", ["path", "nodata"],
                                    extraction.INDEX_FIX, columns=["path", "nodata"], ignore_geometry=True)
            known = dict(zip(old["path"], old["nodata"]))
        status = extraction.extract_cells(cells, out, px=cfg.ses.cell_px, workers=cfg.workers, known=known)
        cells["nodata"] = status["nodata"].round(6)
        extraction.report_failed(status["failed"].dropna().tolist(), cfg.strict)  # unreadable tiles
        cells["non_void"] = cells["nodata"] <= cfg.ses.max_nodata

    # 4. the cell index (a shard's partial one under --shard), then the config beside it
    index = cells[["cell_id", "city", "income", "imputed", "imputed_policy", "ortho_product", "path", "non_void",
                   "nodata", "geometry"]]
    with atomic_path(index_path) as tmp:
        index.to_file(tmp, layer="cells", driver="GPKG", engine="pyogrio")
        gis_style.style_gpkg(tmp, "cells", "income")
    save_run_config(cfg, out, name="extract_config.yaml")
    write_json(out / "extract_counts.json", counts)  # census rows dropped per city, and why
    if not args.shard:  # an index without a usable cell is a stop, not a success (one shard may hold none)
        extraction.check_usable(cells, cfg.ses.max_nodata, index_path)
    done = int(status["extracted"].sum())
    failed = int(status["failed"].notna().sum()) if "failed" in status else 0
    how = f"merged from {args.merge} shards" if args.merge else \
        f"{done} extracted, {len(cells) - done - failed} already there" + (f", {failed} unreadable" if failed else "")
    print(f"[{tag}] {len(cells)} cells ({how}), {int((~cells['non_void']).sum())} void "
          f"(> {cfg.ses.max_nodata:.0%} nodata), {product} orthophotos, INSEE-imputed cells: "
          f"{imputed_count['keep']} kept, {imputed_count['drop']} dropped (ses.imputed={cfg.ses.imputed}) "
          f"in {time.time() - start:.1f} s -> {index_path}")


if __name__ == "__main__":
    entry.run(main)
