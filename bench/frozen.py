"""Frozen-feature training (``*.train.freeze=backbone``) vs fine-tuning, per image, on CPU at the papers' sizes:
ResNet-50 at 224 px (cities) and EfficientNet-B0 on 800 px cells (SES).

    python bench/frozen.py [--images 4] [--repeats 2] [--epochs-cities 100] [--epochs-ses 200] [--only cities,ses]

Paths, each through the project's own code on the same random batches, one thread:
- fine-tune: an epoch of ``loops.train_epoch`` on the whole model (forward, backward, Adam step);
- embed: ``frozen.embed`` (the model in eval mode, no gradients): what a frozen run pays once;
- head: an epoch of ``loops.train_epoch`` on ``frozen.HeadOnly`` over the embeddings: what it pays every epoch.
A frozen run's epoch costs head + embed / epochs (the run's epochs: the papers' configs' by default). Checks
that the paths do what they say: the fine-tuning epoch moved the backbone, the head epoch did not, and the
embeddings are the model's own penultimate features. Prints ``frozen_vs_finetune_epoch_<case>`` (target
>= 3x: frozen features are only worth their caveats when they are that much cheaper) and
``frozen_embed_once_vs_finetune_epoch_<case>`` (the embedding pass alone against one fine-tuning epoch:
forward without backward, target >= 2x).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, median, single_thread, table, time_runs, verdict  # noqa: E402

single_thread()
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from urbanlens.core import backbones, frozen, loops, runtime  # noqa: E402
from urbanlens.core.placement import Placement  # noqa: E402

CASES = {"cities": ("resnet50", 224, 8), "ses": ("efficientnet_b0", 800, 5)}  # backbone, input px, classes
CPU = Placement(torch.device("cpu"))


def build(name: str, classes: int, seed: int):
    runtime.seed_everything(seed)
    return backbones.build_backbone(name, classes, pretrained=False)


def case(name: str, px: int, classes: int, args) -> tuple[float, float, float]:
    """(fine-tune, embed, head) seconds per image of one epoch over ``args.images`` images."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, px, px, generator=g)
    y = torch.arange(args.images) % classes
    images = torch.utils.data.TensorDataset(x, y)
    batch = max(2, args.images // 2)  # two steps an epoch, batch norm needs two images a step
    loader = loops.make_loader(images, batch, 0, CPU.device)

    tuned = build(name, classes, 0)
    start = {k: v.clone() for k, v in tuned.state_dict().items()}
    opt = loops.Optimiser(torch.optim.Adam(tuned.parameters(), lr=1e-4))
    fine = time_runs(lambda: loops.train_epoch(tuned, loader, opt, F.cross_entropy, CPU, min_batch=2, desc=None),
                     args.repeats)
    moved = [k for k, v in tuned.state_dict().items() if not k.startswith(("fc.", "classifier."))
             and v.is_floating_point() and not torch.equal(v, start[k])]
    if not moved:
        raise SystemExit(f"{name}: the fine-tuning epoch left the backbone as it was; not a fine-tuning epoch")

    model = build(name, classes, 0)
    layer = backbones.head(model)
    frozen.freeze(model, layer)
    out = {}

    def embed():
        out["vectors"], out["labels"] = frozen.embed(model, images, lambda d: loops.make_loader(d, batch, 0, CPU.device),
                                                     layer.in_features, CPU)

    emb = time_runs(embed, args.repeats)
    _, direct = backbones.logits_and_embeddings(model.eval(), x[:2])
    if not np.allclose(out["vectors"][:2], direct.numpy(), rtol=1e-4, atol=1e-5):
        raise SystemExit(f"{name}: frozen.embed does not give the model's own penultimate features")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = frozen.HeadOnly(model, layer)
    vectors = loops.make_loader(frozen.Embeddings(out["vectors"], out["labels"]), batch, 0, CPU.device)
    head_opt = loops.Optimiser(torch.optim.Adam(model.parameters(), lr=1e-4))
    head_times = time_runs(lambda: loops.train_epoch(head, vectors, head_opt, F.cross_entropy, CPU, min_batch=2,
                                                     desc=None), args.repeats)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if not changed or any(not k.startswith(("fc.", "classifier.")) for k in changed):
        raise SystemExit(f"{name}: the head epoch changed {changed or 'nothing'}; it must change the head alone")
    return median(fine), median(emb), median(head_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images an epoch (two steps)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs-cities", type=int, default=100, help="the run's epochs (configs/cities.yaml: 100)")
    parser.add_argument("--epochs-ses", type=int, default=200, help="the run's epochs at most (configs/ses.yaml: "
                        "200 with early stopping; the fewer it runs, the more the embedding weighs)")
    parser.add_argument("--only", default="cities,ses")
    args, _ = parser.parse_known_args()  # run.sh bench passes every benchmark the same flags
    header("frozen", args)
    results = []
    for key in args.only.split(","):
        name, px, classes = CASES[key]
        epochs = args.epochs_cities if key == "cities" else args.epochs_ses
        fine, emb, head = case(name, px, classes, args)
        per_epoch = head + emb / epochs
        print(table([("fine-tune epoch", fine), ("embed (once)", emb), ("head epoch", head),
                     (f"frozen epoch (embed / {epochs} + head)", per_epoch)], args.images, "image", "fine-tune epoch"))
        results.append((key, px, fine / per_epoch, fine / emb, epochs))
    for key, px, amortised, once, epochs in results:
        verdict(f"frozen_vs_finetune_epoch_{key}_{px}", amortised, 3.0, True, f"embedding amortised over {epochs} epochs")
        verdict(f"frozen_embed_once_vs_finetune_epoch_{key}_{px}", once, 2.0, True, "forward alone vs forward + backward")


if __name__ == "__main__":
    main()
