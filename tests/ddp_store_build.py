"""Run by tests/test_store.py under torchrun (2 CPU ranks, gloo): build a store whose decoding takes
longer than the process group's timeout, twice, and print what each rank saw.

    torchrun --nproc_per_node 2 tests/ddp_store_build.py FOLDER TIMEOUT_S DELAY_S WORKERS

``shared``: ``store.ensure(..., distributed=True)``, each rank decodes its share; every item is checked.
``rank0``: the trainers' former way, rank 0 builds alone while the other rank waits at a barrier (it
must time out: the control that shows the first build would have failed the old way).
"""
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist

from urbanlens.core import placement, store

SHAPE = (3, 8, 8)


def slow_decode(delay: float):
    def decode(f):
        time.sleep(delay)  # a slow image decoder
        return np.full(SHAPE, int(Path(f).stem), np.uint8)
    return decode


def main() -> None:
    folder, timeout_s, delay, workers = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    rank, world = placement.setup_distributed()
    dist.barrier()  # every rank started: from here on the shortened timeout applies
    dist.set_timeout(timedelta(seconds=timeout_s))
    files = sorted(folder.glob("*.src"), key=lambda f: int(f.stem))
    decode = slow_decode(delay)

    t0 = time.perf_counter()
    data, built = store.ensure(folder / "shared", files, decode, SHAPE, {"v": 1}, None, workers, True)
    ok = all(int(data[i, 0, 0, 0]) == int(f.stem) for i, f in enumerate(files))
    print(f"shared rank {rank}/{world}: built={built} seconds={time.perf_counter() - t0:.2f} items_ok={ok}", flush=True)

    t0 = time.perf_counter()
    try:
        if rank == 0:
            store.ensure(folder / "alone", files, decode, SHAPE, {"v": 1}, None, workers)
        dist.barrier()
        outcome = "waited"
    except Exception as e:  # gloo: "Timed out waiting ... for recv", or the peer that timed out is gone
        outcome = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    print(f"rank0 rank {rank}/{world}: {outcome} after {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()
