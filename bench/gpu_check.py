"""One-command check of a GPU machine: both demo pipelines on CUDA, DDP over NCCL, AMP vs float32 and the
training / mapping speed at the papers' sizes, with peak GPU memory.

    bash run.sh gpu-check            (python bench/gpu_check.py)      about 10 minutes on one GPU
    python bench/gpu_check.py --cpu-dry-run [--parts ddp,speed]       the same code paths, tiny, on CPU

Parts (``--parts``, comma-separated, default all):
  pipelines  every stage of both demo pipelines (configs/cities_demo.yaml, ses_demo.yaml) as the scripts
             run them, on a temporary data and results folder, with --set device=cuda, cities.train.amp and
             ses.train.amp ``auto`` (float16 + loss scaling), ses.cams.amp ``bf16``, NHWC layout
  ddp        one training step of a small ResNet in two processes under DistributedDataParallel (NCCL;
             run only where two GPUs are visible): the two replicas' weights agree afterwards. Then both
             trainers in one process and under torchrun with 2 ranks, same global batch
             (tests/ddp_equal_train.py, float64; on the CPU over gloo where fewer than two GPUs are
             visible): the 2-rank weights equal the single-process ones within its WEIGHTS_RTOL
  speed      the project's step (loops.train_step: autocast, grad scaler, channels_last) and a plain
             float32 NCHW step, images per second and peak GPU memory: ResNet-50 at 224 px, batch 128
             (the city classifier); EfficientNet-B0 at 800 px, batch 10 (the income model); guided Grad-CAM
             of both classes per cell at 800 px (ses.cams.batch_size cells a batch), float32 vs bf16. The first
             batch's loss under AMP agrees with float32 within 1 %.
  store      a uint8 store built under torchrun by 2 ranks (tests/ddp_store_build.py): decoding longer than
             the process group's timeout (2 s) passes when every rank builds its share, and the former
             rank-0 build makes the waiting rank time out
  loader     bench/training_loader.py on this device: wall-clock images/s and MB/s of the trainers' loaders
             with the store dropped from the page cache, beside the MB/s published A100 rates need
Prints one table; exits non-zero when a part fails. Without CUDA it says so in one line and exits 1,
unless ``--cpu-dry-run``: tiny sizes, bfloat16 autocast on the CPU, DDP over gloo, pipelines shortened.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torchvision  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from urbanlens.core import backbones, cam, config, loops, placement  # noqa: E402
from urbanlens.core.placement import Placement  # noqa: E402
from urbanlens.ses import model as ses_model  # noqa: E402

STAGES = {"cities": ["-m urbanlens.cities.world", "preprocessing.py", "train_classification.py",
                     "test_classification.py", "saliency.py"],
          "ses": ["-m urbanlens.ses.world", "generate_fr_ua_aerial_data.py", "efficientnet_training.py",
                  "gradcaming_urban_areas.py"]}
TINY = {"cities": ["cities.world.n_cities=3", "cities.world.n_sites=2", "cities.world.images_per_site=1", "cities.world.image_size=96",
                   "cities.patch.size=48", "cities.patch.stride=48", "cities.split.test_b_per_city=2", "cities.model.input_size=32",
                   "cities.train.epochs=1", "cities.train.batch_size=4", "cities.train.max_steps_per_epoch=2", "cities.test.bootstrap=20",
                   "cities.saliency.per_city=1"],
        "ses": ["ses.world.city_size_m=1000", "ses.world.withhold=0", "ses.world.cities=[Paris]", "ses.cities=[Paris]", "ses.cell_px=32",
                "ses.model.input_size=32", "ses.train.epochs=1", "ses.train.batch_size=4", "ses.cams.panels=1"]}


# ------------------------------------------------------------------ parts
def pipeline_commands(which: str, work: Path, device: str, tiny: bool) -> list[list[str]]:
    """The stage commands of one demo pipeline on ``work``'s data and results folders."""
    amp = "bf16" if device == "cpu" else "auto"  # CPU autocast is bfloat16 only
    sets = [f"device={device}", f"paths.data={work / 'data'}", f"paths.results={work / 'results'}",
            f"cities.train.amp={amp}", "cities.train.channels_last=true", f"ses.train.amp={amp}", "ses.cams.amp=bf16",
            *(TINY[which] if tiny else [])]
    args = ["--config", f"configs/{which}_demo.yaml", *[a for s in sets for a in ("--set", s)]]
    return [[sys.executable, *stage.split(), *args] for stage in STAGES[which]]


def run_pipelines(work: Path, device: str, tiny: bool) -> list[tuple]:
    rows = []
    for which in STAGES:
        start, failed = time.perf_counter(), None
        for cmd in pipeline_commands(which, work, device, tiny):
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                failed = f"{cmd[1] if cmd[1] != '-m' else cmd[2]}: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
                break
        rows.append((f"{which} demo pipeline", "amp", f"{time.perf_counter() - start:.0f} s", "", failed or "ok"))
    return rows


def _ddp_worker(rank: int, world: int, backend: str, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    amp = "auto" if device.type == "cuda" else "bf16"
    model = placement.to_device(torchvision.models.resnet18(num_classes=4), device, True, amp)
    model = placement.wrap_distributed(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)
    loops.train_step(model, loops.Optimiser(opt, None, placement.grad_scaler(device, amp)), x, y, F.cross_entropy,
                     Placement(device, amp, True))
    flat = torch.cat([p.detach().float().flatten() for p in placement.unwrap(model).parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        out.put(float((gathered[0] - gathered[1]).abs().max()))
    dist.destroy_process_group()


def run_ddp(device: str) -> list[tuple]:
    if device == "cuda" and torch.cuda.device_count() < 2:
        return [("DDP step, 2 processes", "", "", "", f"skipped: {torch.cuda.device_count()} GPU visible")]
    backend = "nccl" if device == "cuda" else "gloo"
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, backend, 29500 + os.getpid() % 1000, out), nprocs=2,
                       start_method="spawn")
    gap = out.get()
    amp = "auto" if device == "cuda" else "bf16"
    return [(f"DDP step, 2 processes ({backend})", amp, "", "", "ok" if gap == 0 else f"replicas differ by {gap:.1e}")]


def run_ddp_equal(work: Path, device: str) -> list[tuple]:
    """tests/ddp_equal_train.py in one process and under torchrun (2 ranks), then its comparison."""
    sys.path.insert(0, str(ROOT / "tests"))
    import ddp_equal_train as driver

    where = "" if device != "cuda" or torch.cuda.device_count() >= 2 else ", on the CPU: 1 GPU visible"
    device = "cpu" if where else device
    script, env = str(ROOT / "tests" / "ddp_equal_train.py"), {**os.environ, "PYTHONPATH": str(ROOT),
                                                              "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    one = subprocess.Popen([sys.executable, script, str(work / "one"), "--device", device], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, str(work / "two"), "--device", device], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1200)
    one_err = one.communicate(timeout=1200)[1]
    seconds = f"{time.perf_counter() - start:.0f} s"
    backend = "nccl" if device == "cuda" else "gloo"
    if one.returncode or two.returncode:
        err = (one_err if one.returncode else two.stderr).strip().splitlines() or ["?"]
        return [(f"DDP = one process, both trainers ({backend}{where})", "fp64", seconds, "", f"FAIL: {err[-1][:200]}")]
    rows = []
    for name, d in driver.differences(work / "one", work / "two").items():
        verdict = (f"weights within {d['max_rel_diff']:.1e} (limit {driver.WEIGHTS_RTOL:g}), "
                   f"{'same' if d['same_log'] else 'OTHER'} epoch log")
        rows.append((f"DDP = one process, {name} trainer, 2 ranks ({backend}{where})", "fp64", seconds, "",
                     ("ok: " if d["ok"] else "FAIL: ") + verdict))
    return rows


def _timed(fn, device: torch.device, steps: int) -> tuple[float, float]:
    """Seconds per call of ``fn`` (after one warm-up call) and peak GPU memory in MB (0 on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return seconds, torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0


def _step_rows(name, build, size, batch, loss_fn, n_out, device, amp, steps) -> list[tuple]:
    """The project's step under ``amp`` vs plain float32 NCHW, same initial weights and batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, n_out, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    init = build().state_dict()
    rows, first = [], {}
    for label, a, nhwc in ((f"{amp} + channels_last", amp, True), ("fp32 NCHW", "off", False)):
        model = build()
        model.load_state_dict(init)
        model = placement.to_device(model, device, nhwc, a)
        with torch.no_grad():
            with placement.autocast(device, a):
                first[a] = loss_fn(model(placement.batch_to_device(x, device, nhwc, a)).float(), y).item()
        opt, scaler = torch.optim.Adam(model.parameters(), lr=1e-4), placement.grad_scaler(device, a)
        seconds, peak = _timed(lambda m=model, o=opt: loops.train_step(m, loops.Optimiser(o, None, scaler), x, y, loss_fn,
                                                                             Placement(device, a, nhwc)),
                               device, steps)
        rows.append((name, label, f"{batch / seconds:.1f} img/s", f"{peak:.0f}", ""))
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rel = abs(first[amp] - first["off"]) / abs(first["off"])
    if placement.autocast_dtype(device, amp) == torch.float16:  # judged for float16 (CUDA) only
        verdict = ("ok" if rel < 1e-2 else "FAIL") + f": first loss within {rel:.1e} of fp32 (limit 1e-2)"
    else:  # bfloat16 keeps 8 significant bits: on untrained deep nets the loss moves by several %
        verdict = f"ok: first loss within {rel:.1e} of fp32 (bf16, not judged)"
    rows[0] = rows[0][:4] + (verdict,)
    return rows


def _cam_rows(size, batch, device, steps) -> list[tuple]:
    cfg = config.load_config(None, ["ses.model.pretrained=false", f"ses.model.input_size={size}"])
    torch.manual_seed(0)
    model = ses_model.build_ses_model(cfg)
    layer = backbones.last_conv_layer(model)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    rows = []
    for a in ("off", "bf16"):
        m = placement.to_device(model, device, True, a)
        xb = placement.batch_to_device(x, device, True, a)
        seconds, peak = _timed(lambda: [cam.guided_gradcam(m, layer, xb, k, 99.0, a) for k in (0, 4)], device, steps)
        rows.append((f"guided Grad-CAM {size} px, both classes", a, f"{batch / seconds:.2f} cell/s", f"{peak:.0f}", ""))
    return rows


def run_store(work: Path) -> list[tuple]:
    folder = work / "store_build"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.src").write_text("x")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_store_build.py"), str(folder), "2", "0.25", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    out = done.stdout
    ok = (done.returncode == 0 and out.count("items_ok=True") == 2 and "rank0 rank 1/2: failed" in out)
    seconds = [float(w.split("=")[1]) for w in out.split() if w.startswith("seconds=")]
    return [("store build under torchrun, 2 ranks, timeout 2 s", "", f"{max(seconds, default=0):.1f} s", "",
             "ok: shared build passed, rank-0 build timed out" if ok else f"FAIL: {(out + done.stderr)[-200:]}")]


def run_loader(device: torch.device, tiny: bool) -> list[tuple]:
    sizes = (["--loader-items", "64", "--loader-reads", "32", "--loader-cells", "8", "--loader-cell-reads", "4",
              "--files", "2", "--cells", "1", "--repeats", "1"] if tiny else [])
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "training_loader.py"), "--device", device.type,
                           *sizes], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return [("loader (wall clock, page cache dropped)", "", "", "", f"FAIL: {done.stderr.strip()[-200:]}")]
    vals = dict(line.split(": ") for line in done.stdout.splitlines() if line.startswith("training_loader_"))
    return [(f"loader {name}, store read from disk", "uint8", f"{vals[f'training_loader_wall_img_s_{name}']} img/s, "
             f"{vals[f'training_loader_wall_mb_s_{name}']} MB/s", "",
             f"ok (A100 needs {vals[f'training_loader_a100_needs_mb_s_{name}']} MB/s)") for name in ("cities_224", "ses_800")]


def run_speed(device: torch.device, tiny: bool) -> list[tuple]:
    amp = "auto" if device.type == "cuda" else "bf16"
    r, e, c = ((32, 4), (32, 2), (32, 2)) if tiny else ((224, 128), (800, 10), (800, 8))
    steps = 1 if tiny else 5
    resnet = lambda: torchvision.models.get_model("resnet18" if tiny else "resnet50", num_classes=8)  # noqa: E731
    ses_cfg = config.load_config(None, ["ses.model.pretrained=false", f"ses.model.input_size={e[0]}"])
    effnet = lambda: ses_model.build_ses_model(ses_cfg)  # noqa: E731
    return (_step_rows(f"ResNet-{18 if tiny else 50} {r[0]} px, batch {r[1]}", resnet, *r, F.cross_entropy, 8, device, amp, steps)
            + _step_rows(f"EfficientNet-B0 {e[0]} px, batch {e[1]}", effnet, *e, F.nll_loss, 5, device, amp, steps)
            + _cam_rows(*c, device, steps))


# ------------------------------------------------------------------ report
def print_table(rows: list[tuple]) -> None:
    head = ("check", "precision", "speed / time", "peak GPU MB", "result")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: the code paths, no speeds")
    ap.add_argument("--parts", default="pipelines,ddp,speed,store,loader",
                    help="comma-separated: pipelines, ddp, speed, store, loader")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}); "
              "run it on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if args.cpu_dry_run:
        torch.set_num_threads(1)  # tiny work: one thread is faster than a contended pool
    name = "CPU (dry run, tiny sizes)" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    print(f"gpu-check on {name}, torch {torch.__version__}")
    parts, rows, start = args.parts.split(","), [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="urbanlens-gpu-check-") as work:
        for part, run in (("pipelines", lambda: run_pipelines(Path(work), device.type, args.cpu_dry_run)),
                          ("ddp", lambda: run_ddp(device.type) + run_ddp_equal(Path(work), device.type)), ("speed", lambda: run_speed(device, args.cpu_dry_run)),
                          ("store", lambda: run_store(Path(work))), ("loader", lambda: run_loader(device, args.cpu_dry_run))):
            if part in parts:
                try:
                    rows += run()
                except Exception as e:  # a failed part is a row of the table; the others still run
                    rows.append((part, "", "", "", f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    print_table(rows)
    print(f"gpu-check: {time.perf_counter() - start:.0f} s")
    return 1 if any(r[4] and not r[4].startswith(("ok", "skipped")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
