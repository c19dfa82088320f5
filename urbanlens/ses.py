"""Per-city income-quintile model: labels, binomial head, EfficientNet-B0, cell images, training, metrics.

The model (Levy Abitbol & Karsai, 2020) maps a census cell's aerial image to one sigmoid unit ``p`` and
reads the five ordered income quintiles as a binomial distribution, P(k) = C(4,k) p^k (1-p)^(4-k).
The network returns the log of these five probabilities, so categorical cross-entropy is ``NLLLoss`` on
its output and a Grad-CAM target is one of its five outputs.
"""
from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from scipy import stats
from sklearn import metrics as skm
from torch import nn
from torch.nn import functional as F

from . import models, runtime

N_CLASSES = 5
CLASS_NAMES = ("q1 poorest", "q2", "q3", "q4", "q5 richest")
METRICS = ("accuracy", "macro_f1", "kappa_quadratic", "auc_poor_rich", "spearman")
_LOG_BINOM = torch.tensor([math.log(math.comb(N_CLASSES - 1, k)) for k in range(N_CLASSES)])


# ----------------------------------------------------------------------------------------- labels

def income_quintiles(income) -> np.ndarray:
    """Income quintile of each cell within its city: 0 = poorest fifth ... 4 = richest fifth.

    Classes come from the rank of each income, so they hold equal counts (to within one) and equal
    incomes always share a class (ties get their average rank instead of breaking quantile edges).
    """
    income = np.asarray(income, dtype=float).ravel()
    if income.size == 0:
        raise ValueError("income_quintiles: no incomes given")
    if not np.all(np.isfinite(income)):
        raise ValueError("income_quintiles: incomes must be finite (drop cells without income first)")
    ranks = stats.rankdata(income, method="average")  # 1..n
    return np.clip(np.floor((ranks - 0.5) * N_CLASSES / income.size), 0, N_CLASSES - 1).astype(np.int64)


def quintile_edges(income, labels) -> list[float]:
    """The highest income of each class but the last: a cell above ``edges[k]`` is richer than class k."""
    income, labels = np.asarray(income, float), np.asarray(labels)
    return [float(income[labels == k].max()) if np.any(labels == k) else float("nan")
            for k in range(N_CLASSES - 1)]


# ----------------------------------------------------------------------------------------- model

def binomial_log_probs(logit: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [B, 5] of the binomial over ordered classes with success p = sigmoid(logit).

    log P(k) = log C(4,k) + k log p + (4-k) log(1-p), with log p and log(1-p) from ``logsigmoid`` so the
    result stays finite for any logit. Computed in float32 even under autocast.
    """
    logit = logit.float().reshape(-1, 1)
    k = torch.arange(N_CLASSES, device=logit.device, dtype=logit.dtype)
    log_c = _LOG_BINOM.to(device=logit.device, dtype=logit.dtype)
    return log_c + k * F.logsigmoid(logit) + (N_CLASSES - 1 - k) * F.logsigmoid(-logit)


def expected_class(log_probs) -> np.ndarray:
    """Mean class sum_k k P(k) of each row of log-probabilities."""
    p = np.exp(np.asarray(log_probs, dtype=np.float64))
    return p @ np.arange(p.shape[1])


class SESModel(nn.Module):
    """Convolutional ``features`` -> global average pooling -> dropout -> ``fc`` (one unit) -> binomial.

    ``forward`` returns log-probabilities [B, 5] of the income quintiles; ``logit`` the sigmoid input.
    ``models.last_conv_layer`` finds ``features[-1]``.
    """

    def __init__(self, features: nn.Module, in_features: int, dropout: float = 0.2):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(self.dropout(z)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binomial_log_probs(self.logit(x))


def build_ses_model(cfg) -> SESModel:
    """The SES model of ``cfg.ses_model``: EfficientNet-B0 (or a ResNet) features, ImageNet weights when
    ``pretrained`` (from ``weights_path`` or torch's cache; never downloaded)."""
    mc = cfg.ses_model
    name = mc.backbone
    if name not in models.BACKBONES:
        raise ValueError(f"ses_model.backbone '{name}' unknown; choose one of {', '.join(models.BACKBONES)}")
    if name.startswith("efficientnet"):
        net = torchvision.models.get_model(name, weights=None, stochastic_depth_prob=mc.stochastic_depth)
    else:
        net = torchvision.models.get_model(name, weights=None)
    if mc.pretrained:
        try:
            net.load_state_dict(models.imagenet_state_dict(name, mc.weights_path))
        except models.WeightsUnavailable as e:
            raise models.WeightsUnavailable(str(e).replace("--set model.", "--set ses_model.")) from None
    in_features = models.head(net).in_features
    if hasattr(net, "features"):
        features = net.features
    else:  # ResNet: every block up to layer4, so features[-1] is layer4
        features = nn.Sequential(*[m for n, m in net.named_children() if n not in ("avgpool", "fc")])
    model = SESModel(features, in_features, dropout=mc.dropout)
    if mc.bn_momentum > 0:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = mc.bn_momentum
    return model


def load_ses_model(path, map_location="cpu") -> tuple[SESModel, dict]:
    """Rebuild a trained SES model (in eval mode, on ``map_location``) from a checkpoint written by the
    training stage, with no download; also return the checkpoint (config, fold, quintile_edges, ...)."""
    from .config import load_config

    ckpt = runtime.load_checkpoint(path, map_location=map_location)
    cfg = load_config(None)  # defaults, so checkpoints from before a key existed still load
    cfg.ses_model.update({k: v for k, v in ckpt["config"].get("ses_model", {}).items() if k in cfg.ses_model})
    cfg.ses_model["pretrained"] = False
    model = runtime.load_weights(build_ses_model(cfg), ckpt["model"], path,
                                 f"a {cfg.ses_model.backbone} income model")
    return model.to(map_location).eval(), ckpt


# ----------------------------------------------------------------------------------------- images

def load_cell_image(path, size: int) -> torch.Tensor:
    """A cell PNG as float [3, size, size], resized (antialiased) and min-max scaled to [0, 1] over the
    whole image (the paper's per-image scaling). A constant image becomes all zeros."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read as an image ({e})") from None
    img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))  # one copy
    if img.shape[-2:] != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
        lo, hi = img.min(), img.max()
    else:  # the extremes of the 8-bit pixels, cheaper than on floats
        lo, hi = torch.tensor(float(arr.min())), torch.tensor(float(arr.max()))
    return img.sub_(lo).div_(hi - lo) if hi > lo else torch.zeros_like(img)


class CellDataset(torch.utils.data.Dataset):
    """(image, label) pairs of cell PNGs; ``cache=True`` decodes every image once, up front."""

    def __init__(self, files, labels, size: int, cache: bool = False):
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.size = size
        self.images = None
        if cache and self.files:
            self.images = torch.stack([load_cell_image(f, size) for f in self.files])

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "CellDataset":
        """The items at ``indices``, sharing the decoded images when cached."""
        idx = np.asarray(indices, dtype=int)
        sub = copy.copy(self)
        sub.files = [self.files[i] for i in idx]
        sub.labels = self.labels[torch.as_tensor(idx, dtype=torch.long)]
        sub.images = self.images[torch.as_tensor(idx, dtype=torch.long)] if self.images is not None else None
        return sub

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else load_cell_image(self.files[i], self.size)
        return img, self.labels[i]


def random_flips(x: torch.Tensor, generator: torch.Generator | None = None,
                 rotate: bool = False) -> torch.Tensor:
    """Flip each image of a batch [B, C, H, W] horizontally and vertically, each with probability 1/2.

    ``rotate`` also swaps H and W with probability 1/2 (square images), which together with the two
    flips draws uniformly from all eight right-angle rotations and reflections.
    """
    flips = torch.rand(3, x.shape[0], generator=generator) < 0.5
    x = x.clone()  # only the chosen images are rewritten
    h, v, t = (f.nonzero().flatten().to(x.device) for f in flips)
    if len(h):
        x[h] = x[h].flip(-1)
    if len(v):
        x[v] = x[v].flip(-2)
    if rotate and len(t):
        x[t] = x[t].transpose(-1, -2)
    return x


# ----------------------------------------------------------------------------------------- splits

def fold_seed(seed: int, city: str, fold: int) -> int:
    """A seed for one (city, fold), stable across runs and independent of the city list's order."""
    return (seed * 1_000_003 + zlib.crc32(city.encode()) + 7919 * fold) % 2**31


def stratified_folds(labels, folds: int, val_share: float, seed: int) -> list[dict]:
    """Stratified k-fold indices; inside each training part a stratified validation share.

    Returns one dict per fold with ``train``, ``val`` and ``test`` index arrays (disjoint, covering all).
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=N_CLASSES)
    if counts.min() < folds:
        raise ValueError(f"{len(labels)} cells give a class with {counts.min()} cells, fewer than "
                         f"{folds} folds")
    out = []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (train, test) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        val = np.array([], dtype=int)
        if val_share > 0:  # at least one validation cell per class, so stratification is possible
            n_val = max(math.ceil(val_share * len(train)), len(np.unique(labels[train])))
            train, val = train_test_split(train, test_size=n_val, stratify=labels[train],
                                          random_state=seed + k + 1)
        out.append({"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)})
    return out


def folds_frame(cell_ids, splits: list[dict]) -> pd.DataFrame:
    """The split manifest of a city: one row per (fold, cell) with ``part`` train, val or test,
    sorted by fold then cell id."""
    cell_ids = np.asarray(list(cell_ids), dtype=object)
    rows = [pd.DataFrame({"fold": k, "cell_id": cell_ids[split[part]], "part": part})
            for k, split in enumerate(splits) for part in ("train", "val", "test")]
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["fold", "cell_id", "part"])
    return df.sort_values(["fold", "cell_id"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------- training

@dataclass
class FitResult:
    best_state: dict
    best_val_loss: float
    best_epoch: int
    log: list[dict] = field(default_factory=list)


def _loader(dataset, batch_size, shuffle, seed, workers, distributed=False):
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        shuffle = False
    workers = 0 if getattr(dataset, "images", None) is not None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       generator=generator, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def predict(model: nn.Module, dataset, device, batch_size: int = 32, amp: bool = True) -> np.ndarray:
    """Log-probabilities [N, 5] of every item of ``dataset`` (in order), model in eval mode."""
    model.eval()
    out = []
    for x, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, amp):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, N_CLASSES), np.float32)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader, device, amp: bool = False) -> None:
    """Replace every batch-norm layer's running mean and variance by their exact average over ``loader``
    at the current weights (the other layers stay in eval mode, so dropout and stochastic depth are off).
    Evaluation then sees the statistics of the weights it evaluates, not a lagging running average."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training, momenta = model.training, [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        with runtime.autocast(device, amp):
            model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


def _evaluate(model, loader, device, amp) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with runtime.autocast(device, amp):
                lp = model(x)
            loss_sum += F.nll_loss(lp, y, reduction="sum").item()
            correct += (lp.argmax(1) == y).sum().item()
            n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)


FIT_STATE_VERSION = 1


def load_fit_state(path, tcfg, seed: int) -> dict | None:
    """The training state ``fit`` saved at ``path`` after its last finished epoch, or None when there is
    none or it was saved with other ``ses_train`` settings or another seed (then it must not be resumed)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = runtime.load_checkpoint(path)
    same = (state.get("fit_state_version") == FIT_STATE_VERSION and state.get("seed") == seed
            and state.get("config") == (tcfg.to_dict() if hasattr(tcfg, "to_dict") else dict(tcfg)))
    return state if same else None


def _save_fit_state(path, model, opt, sched, scaler, gen, best: "FitResult", tcfg, seed, restart, epoch,
                    epoch_total, stale) -> None:
    rng = {"torch": torch.get_rng_state(), "flips": gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    runtime.save_checkpoint(path, model, tcfg, opt, epoch_total, fit_state_version=FIT_STATE_VERSION,
                            seed=seed, restart=restart, run_epoch=epoch, epoch_total=epoch_total, stale=stale,
                            scheduler=sched.state_dict(), scaler=scaler.state_dict(), rng=rng,
                            best_state=best.best_state, best_val_loss=best.best_val_loss,
                            best_epoch=best.best_epoch, log=best.log)


def train_step(net: nn.Module, opt, scaler, x: torch.Tensor, y: torch.Tensor, amp: bool) -> tuple[float, int]:
    """One optimisation step on a batch already on the device (channels_last on CUDA, autocast when
    ``amp``): binomial log-probabilities, NLL, backward, Adam through ``scaler``. Returns the batch's
    mean loss and its number of correct argmax predictions."""
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast(x.device, amp):
        lp = net(x)
    loss = F.nll_loss(lp, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.item(), int((lp.detach().argmax(1) == y).sum().item())


def fit(model: nn.Module, train_set, val_set, tcfg, device, seed: int = 0, workers: int = 0,
        progress=None, checkpoint=None, resume: dict | None = None) -> FitResult:
    """Train with Adam, reduce-on-plateau on the validation loss and early stopping with restarts.

    Run r (r = 0..tcfg.restarts) starts from the best weights so far with lr = tcfg.lr / 2**r and stops
    after tcfg.early_stop_patience epochs without a better validation loss, or tcfg.epochs epochs.
    ``progress(row)`` is called after every epoch. The model ends holding the best weights.

    ``checkpoint``: a path where the whole training state is saved after every epoch (weights, optimizer,
    plateau scheduler, grad scaler, early-stopping counter, restart index, RNG states, best weights so
    far and the log). ``resume``: such a state (``load_fit_state``); training continues after its
    epoch and, with the same seed on the same device, ends exactly as an uninterrupted fit does.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    amp = bool(tcfg.amp) and device.type == "cuda"
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    gen = torch.Generator().manual_seed(seed)
    val_loader = _loader(val_set, tcfg.batch_size, False, seed, workers)
    best = FitResult(copy.deepcopy(model.state_dict()), math.inf, -1)
    epoch_total, first_restart = 0, 0
    if resume is not None:
        best = FitResult(resume["best_state"], resume["best_val_loss"], resume["best_epoch"], list(resume["log"]))
        epoch_total, first_restart = resume["epoch_total"], resume["restart"]
        gen.set_state(resume["rng"]["flips"])
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    save = checkpoint is not None and runtime.is_main_process()
    for restart in range(first_restart, tcfg.restarts + 1):
        resumed = resume is not None and restart == first_restart
        if restart and not resumed:
            model.load_state_dict(best.best_state)
        opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr / 2 ** restart)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=tcfg.plateau_factor,
                                                           patience=tcfg.plateau_patience)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        stale, first_epoch = 0, 0
        if resumed:  # the run that was going on: its weights, optimizer, scheduler and counters
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            stale, first_epoch = resume["stale"], resume["run_epoch"]
            if stale >= tcfg.early_stop_patience:
                continue
        for epoch in range(first_epoch, tcfg.epochs):
            t0 = time.perf_counter()
            train_loader = _loader(train_set, tcfg.batch_size, True, seed + epoch_total, workers, distributed)
            if distributed:
                train_loader.sampler.set_epoch(epoch_total)
            net.train()
            loss_sum, correct, n = 0.0, 0, 0
            for x, y in train_loader:
                if len(y) < 2 and n > 0:  # a lone sample breaks batch norm in training mode
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss, hits = train_step(net, opt, scaler, random_flips(x, gen, rotate=tcfg.rot90), y, amp)
                loss_sum += loss * len(y)
                correct += hits
                n += len(y)
            if distributed:  # each rank updated batch-norm statistics on its own batches: take rank 0's,
                for buf in model.buffers():  # so that every rank validates (and steps its plateau) alike
                    torch.distributed.broadcast(buf, src=0)
            if tcfg.precise_bn:
                recompute_bn_stats(model, _loader(train_set, tcfg.batch_size, False, seed, workers), device, amp)
            val_loss, val_acc = _evaluate(model, val_loader, device, amp) if len(val_set) else (
                loss_sum / max(n, 1), correct / max(n, 1))
            lr = opt.param_groups[0]["lr"]
            sched.step(val_loss)
            improved = val_loss < best.best_val_loss
            if improved:
                best.best_state = copy.deepcopy(model.state_dict())
                best.best_val_loss, best.best_epoch = val_loss, epoch_total
                stale = 0
            else:
                stale += 1
            row = {"run": restart, "epoch": epoch_total, "lr": lr, "train_loss": loss_sum / max(n, 1),
                   "train_acc": correct / max(n, 1), "val_loss": val_loss, "val_acc": val_acc,
                   "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
            best.log.append(row)
            epoch_total += 1
            if save:
                _save_fit_state(checkpoint, model, opt, sched, scaler, gen, best, tcfg, seed, restart, epoch + 1,
                                epoch_total, stale)
            if progress is not None:
                progress(row)
            if stale >= tcfg.early_stop_patience:
                break
    model.load_state_dict(best.best_state)
    return best


def show_epoch(bar, row: dict) -> None:
    """Advance a tqdm bar by one epoch of ``fit`` and show its run and losses."""
    bar.update(1)
    bar.set_postfix(run=row["run"], train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")


# ----------------------------------------------------------------------------------------- metrics

def ses_metrics(y_true, log_probs) -> dict:
    """Scores of predicted quintile distributions against true quintiles.

    Returns accuracy, macro F1, quadratic-weighted Cohen's kappa, ``auc_poor_rich`` (ROC AUC on cells
    whose true class is 0 or 4, scored by P(4) / (P(0) + P(4)), computed as the log-odds log P(4) -
    log P(0), which orders cells identically without saturating), ``spearman`` (between the expected
    class and the true class), ``n``, plus ``classification_report`` (text) and ``confusion_matrix``
    (5 x 5 array, rows true, columns predicted). Undefined scores are NaN.
    """
    y = np.asarray(y_true).astype(int)
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape != (len(y), N_CLASSES):
        raise ValueError(f"log_probs must be [{len(y)}, {N_CLASSES}], got {list(lp.shape)}")
    labels = list(range(N_CLASSES))
    pred = lp.argmax(1)
    out = {"n": int(len(y)), "accuracy": float(np.mean(pred == y)) if len(y) else float("nan")}
    out["macro_f1"] = float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    out["kappa_quadratic"] = _safe(lambda: skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    ends = (y == 0) | (y == N_CLASSES - 1)
    out["auc_poor_rich"] = _safe(lambda: skm.roc_auc_score(y[ends] == N_CLASSES - 1,
                                                           lp[ends, -1] - lp[ends, 0]))
    out["spearman"] = _safe(lambda: stats.spearmanr(expected_class(lp), y).statistic)
    out["classification_report"] = skm.classification_report(
        y, pred, labels=labels, target_names=list(CLASS_NAMES), digits=3, zero_division=0)
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels)
    return out


def _safe(fn) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn())
        except ValueError:
            return float("nan")
    return v if np.isfinite(v) else float("nan")


def scalar_metrics(m: dict) -> dict:
    """The numeric entries of ``ses_metrics``' result (what goes into metrics.json)."""
    return {k: m[k] for k in ("n", *METRICS)}


def summarize_folds(fold_metrics: list[dict], val_losses: list[float]) -> dict:
    """Mean and standard deviation (ddof=1; 0 for one fold) of each metric over folds, NaNs ignored, and
    ``best_fold``: the fold whose best checkpoint has the lowest validation loss."""
    mean, std = {}, {}
    for k in METRICS:
        v = np.array([m[k] for m in fold_metrics], dtype=float)
        v = v[np.isfinite(v)]
        mean[k] = float(v.mean()) if v.size else float("nan")
        std[k] = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else float("nan"))
    return {"best_fold": int(np.argmin(val_losses)), "mean": mean, "std": std}


def predictions_frame(cell_ids, fold: int, y_true, log_probs) -> pd.DataFrame:
    """One row per held-out cell: cell_id, fold, true_class, pred_class, expected_class, p_0..p_4."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    df = pd.DataFrame({"cell_id": list(cell_ids), "fold": fold, "true_class": np.asarray(y_true, int),
                       "pred_class": lp.argmax(1), "expected_class": p @ np.arange(N_CLASSES)})
    for k in range(N_CLASSES):
        df[f"p_{k}"] = p[:, k]
    return df


def confusion_figure(cm, title: str = ""):
    """A matplotlib figure of a confusion matrix with the quintile names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    skm.ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(CLASS_NAMES)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    return fig


# ----------------------------------------------------------------------------------------- inputs

CELL_COLUMNS = ("cell_id", "city", "income", "path", "non_void")
RUN_KEYS = ("seed", "ses.cell_px", "ses.max_nodata", "ses_model", "ses_train")


def read_cells(path) -> "pd.DataFrame":
    """The cell index (layer ``cells``) written by the extraction stage; ValueError naming the fix."""
    import geopandas as gpd

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: cell index not found; run generate_fr_ua_aerial_data.py first")
    cells = gpd.read_file(path, layer="cells")
    missing = [c for c in CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing from layer 'cells'; "
                         "re-run generate_fr_ua_aerial_data.py to rebuild the index")
    return cells


def readable_image(path) -> str | None:
    """None when ``path`` is an image file whose chunks check out (PIL's verify: cheap, no decoding),
    else what is wrong with it ("missing", "unreadable: <reason>")."""
    if not Path(path).is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def city_cells(cells, city: str, image_root) -> tuple[pd.DataFrame, list[str]]:
    """The city's non-void cells with a finite income whose image exists and reads (sorted by cell id),
    and a line ``<image path> (<problem>)`` for each cell left out because its image is missing or broken."""
    df = cells[(cells["city"] == city) & cells["non_void"].astype(bool)]
    df = df[np.isfinite(df["income"].astype(float))]
    problems = [readable_image(Path(image_root) / p) for p in df["path"]]
    ok = np.array([p is None for p in problems], dtype=bool)
    left_out = [f"{Path(image_root) / p} ({why})" for p, why in zip(df["path"], problems) if why is not None]
    df = df[ok].sort_values("cell_id").reset_index(drop=True)
    return pd.DataFrame(df.drop(columns="geometry", errors="ignore")), left_out


def fits_in_memory(n_images: int, size: int, budget_mb: float) -> bool:
    return n_images * 3 * size * size * 4 <= budget_mb * 2**20


def previous_run_differs(config_file, cfg) -> bool:
    """True when ``config_file`` (a saved run config) trained with other ``RUN_KEYS`` values than ``cfg``."""
    import yaml

    from .config import changed_keys

    path = Path(config_file)
    return path.is_file() and bool(changed_keys(yaml.safe_load(path.read_text()), cfg, RUN_KEYS))


# ----------------------------------------------------------------------------------------- outputs

def write_fold_outputs(fold_dir, cfg, model, fit: FitResult, m: dict, predictions: pd.DataFrame,
                       **info) -> None:
    """Everything one fold leaves: best.pt (weights, config, ``info``), train_log.csv, predictions.csv,
    classification_report.txt, confusion_matrix.csv/.png and, written last to mark the fold as done,
    metrics.json (the scalar metrics, best validation loss and ``info``)."""
    from . import io

    fold_dir = Path(fold_dir)
    runtime.save_checkpoint(fold_dir / "best.pt", model, cfg, epoch=fit.best_epoch, classes=list(CLASS_NAMES),
                            val_loss=fit.best_val_loss, **info)
    io.write_csv(pd.DataFrame(fit.log), fold_dir / "train_log.csv")
    io.write_csv(predictions, fold_dir / "predictions.csv")
    io.write_text(fold_dir / "classification_report.txt", m["classification_report"])
    io.write_csv(pd.DataFrame(m["confusion_matrix"], index=CLASS_NAMES, columns=CLASS_NAMES),
                 fold_dir / "confusion_matrix.csv", index=True, index_label="true \\ predicted")
    title = ", ".join(str(v) if k == "city" else f"{k} {v}" for k, v in info.items() if k in ("city", "fold"))
    io.save_figure(confusion_figure(m["confusion_matrix"], title), fold_dir / "confusion_matrix.png")
    io.write_json(fold_dir / "metrics.json", {
        **{k: v for k, v in info.items() if k != "quintile_edges"}, **scalar_metrics(m),
        "val_loss": fit.best_val_loss, "best_epoch": fit.best_epoch, "epochs_run": len(fit.log),
        "seconds": round(sum(r["seconds"] for r in fit.log), 1)})


def city_summary(city_dir, folds: int, **info) -> tuple[dict, pd.DataFrame]:
    """Cross-fold summary of a city from its fold folders: ``info``, mean/std per metric, ``best_fold``,
    the metrics of all held-out predictions pooled, and each fold's metrics; plus those predictions."""
    from . import io

    city_dir = Path(city_dir)
    per_fold = [io.read_json(city_dir / f"fold_{k}" / "metrics.json") for k in range(folds)]
    preds = pd.concat([pd.read_csv(city_dir / f"fold_{k}" / "predictions.csv") for k in range(folds)])
    preds = preds.sort_values("cell_id").reset_index(drop=True)
    p = preds[[f"p_{k}" for k in range(N_CLASSES)]].to_numpy()
    pooled = scalar_metrics(ses_metrics(preds["true_class"], np.log(np.clip(p, 1e-300, None))))
    summary = {**info, "folds": folds, **summarize_folds(per_fold, [f["val_loss"] for f in per_fold]),
               "pooled": pooled, "per_fold": per_fold}
    return summary, preds
