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

from urbanlens.core import entry, runs, shards
from urbanlens.core.errors import DataError
from urbanlens.core.files import save_run_config, write_json
from urbanlens.core.stage import open_stage
from urbanlens.ses import cell_index, extraction, report_html, rerun


def main() -> None:
    stage = open_stage(__doc__, "generate_fr_ua_aerial_data.py", "configs/ses_demo.yaml", ("ses",),
                       shards.add_shard_args, compute=False,  # the lock: shared by --shard jobs
                       report=report_html.render)
    cfg, args, out = stage.cfg, stage.args, stage.out
    start = time.time()
    index_path = out / "cells.gpkg"

    # A results folder extracted from other data or at another size is not mixed with this run.
    stamp, inputs = out / extraction.STAMP, extraction.run_inputs(cfg)
    rerun.claim(out, stamp, "generate_fr_ua_aerial_data.py", cfg, extraction.RUN_KEYS, inputs,
                "holds cells extracted with other settings", extraction.clear_cells, bool(args.shard))
    if cfg.ses.cell_size_m != 200:
        raise DataError(f"config: ses.cell_size_m={cfg.ses.cell_size_m}; the INSEE grid cells are 200 m")
    # --merge N: every shard's partial index must be there before anything is read
    parts = shards.shard_paths(index_path, args.merge) if args.merge else []

    # 1. orthophoto tile index (EPSG:2154)
    tiles, imagery = cell_index.read_tiles(cfg)

    # 2. per city: cells inside the Urban Atlas boundary, with income, and the tiles they overlap
    cells, imputed_count, counts, used = cell_index.cities_cells(cfg, tiles, imagery)
    # the file or layer used for each role, beside the settings (not compared: the inputs' fingerprint is)
    runs.write_stamp(stamp, "generate_fr_ua_aerial_data.py", cfg, extraction.RUN_KEYS, inputs, extra={"used": used})
    tag = "extract"
    if args.shard:  # this job's share: a contiguous chunk of each city's cells in cell-id order
        i, n = args.shard
        cells = cells.iloc[shards.shard_positions(cells["cell_id"], cells["city"], i, n)].copy()
        index_path, tag = shards.shard_path(index_path, i, n), f"extract {i}/{n}"

    if args.merge:  # 3'. the N shards' partial indexes, checked and put in the order of an unsharded run
        cells, status = cell_index.merged(parts, cells)
    else:  # 3. read every cell from its tile(s), reprojected to EPSG:3035, and save it (resumable)
        status = cell_index.extract(cells, out, index_path, cfg)

    # 4. the cell index (a shard's partial one under --shard), then the config beside it
    cell_index.write_index(cells, index_path)
    save_run_config(cfg, out, name="extract_config.yaml")
    write_json(out / "extract_counts.json", counts)  # census rows dropped per city, and why
    if not args.shard:  # an index without a usable cell is a stop, not a success (one shard may hold none)
        extraction.check_usable(cells, cfg.ses.max_nodata, index_path)
    print(f"[{tag}] {cell_index.describe(cells, status, args.merge, cfg, imputed_count)} "
          f"in {time.time() - start:.1f} s -> {index_path}")


if __name__ == "__main__":
    entry.run(main)
