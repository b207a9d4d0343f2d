"""Training loop: set-valued loss, AdamW + warm-up/cosine, early stopping, patch pooling.

Loss. Each sample has a boolean mask of allowed classes (training/data.py). The loss is
-log sum_{c in mask} softmax(z)_c = logsumexp(z) - logsumexp(z[mask]); for a one-hot mask this
is plain cross-entropy, for binary-source "osteoporosis" it is "low BMD" without guessing which.
Class balance: each sample is weighted by 1 / frequency of its stratum (label as its source means
it), normalised to mean 1, or the same weights drive a WeightedRandomSampler (`balance`).

Patches mode: a training step sees `train_patches` random patches per image; the image logits
are the mean of its patch logits (the same pooling serving applies over its deterministic grid).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from osteogate.model.card import InputSpec, ModelCard
from osteogate.model.taxonomy import CLASSES, REGIONS
from osteogate.training.augment import build_augment
from osteogate.training.cache import to_uint8
from osteogate.training.config import TrainConfig
from osteogate.training.inputs import PatchSampler, normalize, prepare, whole_view
from osteogate.training.metrics import low_bmd_score, pooled_probs
from osteogate.training.networks import create_network, region_rows
from osteogate.training.pool import Pool
from torch import nn


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def set_loss(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of -log P(class in mask) for [B, K, C] view logits.

    P is the mean over the K views of the per-view softmax: the pooling serving applies
    (model/inference.py), so training optimises the probability the gateway reports.
    """
    if logits.ndim == 2:
        logits = logits[:, None]
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, K, C]
    allowed = log_probs.masked_fill(~masks[:, None, :], float("-inf"))
    per_view = torch.logsumexp(allowed, dim=-1)  # log P_k(mask)
    pooled = torch.logsumexp(per_view, dim=1) - math.log(logits.shape[1])
    return -(pooled * weights).sum() / weights.sum()


def balance_weights(strata: list[str]) -> np.ndarray:
    values, inverse, counts = np.unique(np.asarray(strata), return_inverse=True, return_counts=True)
    weights = (1.0 / counts)[inverse]
    return weights / weights.mean()


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainSet(torch.utils.data.Dataset):
    """Augmented inputs of the training fold: ([K or 1, C, s, s], region row, mask, weight)."""

    def __init__(self, pool: Pool, indices: np.ndarray, config: TrainConfig, spec: InputSpec, seed: int) -> None:
        self.pool = pool
        self.indices = np.asarray(indices)
        self.config = config
        self.spec = spec
        self.masks = pool.masks
        self.weights = balance_weights([pool.strata[i] for i in self.indices]) if config.balance == "loss" else np.ones(len(self.indices))
        self.augment = build_augment(config.augment, self.spec.model_size, seed)
        self.rng = np.random.default_rng(seed)
        self.samplers: dict[int, PatchSampler] = {}  # built lazily, reused every epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, torch.Tensor, float]:
        index = int(self.indices[item])
        image = self.pool.images[index]
        if self.spec.mode == "patches":
            if index not in self.samplers:
                self.samplers[index] = PatchSampler(image, self.spec)
            views = self.samplers[index].sample(self.config.train_patches, self.rng)
        else:
            # albumentations' CLAHE needs uint8; the view interpolates 8-bit values anyway.
            views = to_uint8(whole_view(image.astype(np.float32) / 255.0, self.spec)[None])
        batch = np.stack([self.augment(image=v)["image"] for v in views]).astype(np.float32) / 255.0
        x = torch.from_numpy(normalize(batch, self.spec))
        region = REGIONS.index(self.pool.samples[index].region)
        return x, region, torch.from_numpy(self.masks[index]), float(self.weights[item])


def collate(batch: list[tuple[torch.Tensor, int, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, regions, masks, weights = zip(*batch, strict=True)
    return torch.stack(xs), torch.tensor(regions), torch.stack(masks), torch.tensor(weights, dtype=torch.float32)


def forward_views(net: nn.Module, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """x [B, K, C, s, s] -> region-row logits [B, K, n_classes] of every view."""
    b, k = x.shape[:2]
    logits = net(x.flatten(0, 1))  # [B*K, R, C]
    logits = region_rows(logits, regions.repeat_interleave(k))
    return logits.view(b, k, -1)


@torch.no_grad()
def predict_logits(net: nn.Module, images: list[np.ndarray], regions: list[str], spec: InputSpec, device: torch.device) -> np.ndarray:
    """Serving preprocessing (model/preprocess.prepare) -> [N, K, n_classes] logits per network input."""
    net.eval()
    out = []
    for image, region in zip(images, regions, strict=True):
        x = torch.from_numpy(prepare(image.astype(np.float32) / 255.0, spec)).to(device)
        logits = region_rows(net(x), torch.full((x.shape[0],), REGIONS.index(region), device=device))
        out.append(logits.float().cpu().numpy())
    return np.stack(out) if out else np.zeros((0, 1, len(CLASSES)), np.float32)


def validation_score(y: np.ndarray, logits: np.ndarray) -> float:
    """Early-stopping metric: mean of the low-BMD and osteoporosis one-vs-rest AUCs (the screening
    targets); falls back to -NLL when a class is missing from the validation set."""
    from sklearn.metrics import roc_auc_score

    probs = pooled_probs(logits)
    scores = []
    for y_bin, s in (((y >= 1).astype(int), low_bmd_score(probs)), ((y == 2).astype(int), probs[:, 2])):
        if 0 < y_bin.sum() < len(y_bin):
            scores.append(roc_auc_score(y_bin, s))
    if scores:
        return float(np.mean(scores))
    return float(np.log(probs[np.arange(len(y)), y] + 1e-9).mean())


@dataclass
class TrainResult:
    net: nn.Module
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    seconds: float = 0.0
    weights_source: str = "random init"


def device_for(config: TrainConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_network(
    pool: Pool,
    train: np.ndarray,
    val: np.ndarray,
    config: TrainConfig,
    card: ModelCard,
    log: Callable[[str], None] = print,
) -> TrainResult:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # restored below: the setting is process-wide
    try:
        return _train(pool, train, val, config, card, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(pool: Pool, train: np.ndarray, val: np.ndarray, config: TrainConfig, card: ModelCard,
           log: Callable[[str], None]) -> TrainResult:
    from tqdm.auto import tqdm

    set_seed(config.seed)
    device = device_for(config)
    net, weights_source = create_network(card, config)
    cuda = device.type == "cuda"
    net = net.to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)  # faster convs with AMP on GPUs only
    dataset = TrainSet(pool, train, config, card.input, config.seed)
    sampler = None
    if config.balance == "sampler":
        sampler = torch.utils.data.WeightedRandomSampler(
            balance_weights([pool.strata[i] for i in train]), len(train), generator=torch.Generator().manual_seed(config.seed)
        )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler, collate_fn=collate,
        drop_last=len(train) > config.batch_size, generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, int(config.warmup_epochs * len(loader)), total)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and config.amp)
    val_eval = pool.evaluable(val)
    y_val = pool.labels[val_eval]
    history: dict[str, list[float]] = {"train_loss": [], "val_score": [], "val_nll": [], "lr": []}
    best = (-math.inf, 0, copy.deepcopy(net.state_dict()))
    start = time.perf_counter()
    epochs = tqdm(range(config.epochs), desc="epochs", disable=not config.progress, mininterval=5)
    for epoch in epochs:
        net.train()
        losses = []
        for x, regions, masks, weights in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not config.progress, mininterval=5):
            x, regions, masks, weights = x.to(device), regions.to(device), masks.to(device), weights.to(device)
            with torch.autocast(device.type, enabled=cuda and config.amp):
                logits = forward_views(net, x, regions)
            loss = set_loss(logits.float(), masks, weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
        history["train_loss"].append(float(np.mean(losses)))
        history["lr"].append(float(scheduler.get_last_lr()[0]))
        if len(val_eval):
            logits_val = predict_logits(net, [pool.images[i] for i in val_eval], [pool.samples[i].region for i in val_eval], card.input, device)
            score = validation_score(y_val, logits_val)
            from osteogate.training.metrics import nll

            history["val_nll"].append(nll(logits_val, y_val))
        else:
            score = -history["train_loss"][-1]
            history["val_nll"].append(float("nan"))
        history["val_score"].append(score)
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(net.state_dict()))
        log(f"epoch {epoch + 1}/{config.epochs} loss={history['train_loss'][-1]:.4f} val={score:.4f} "
            f"({time.perf_counter() - start:.0f}s)")
        if epoch - best[1] >= config.patience:
            log(f"early stop: no validation improvement for {config.patience} epochs")
            break
    net.load_state_dict(best[2])
    return TrainResult(net=net, history=history, best_epoch=best[1] + 1, seconds=time.perf_counter() - start, weights_source=weights_source)


class NetworkMethod:
    """training/crossval.py Method over train_network."""

    def __init__(self, config: TrainConfig, card: ModelCard, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.card = card
        self.log = log
        self.history: dict[str, list[float]] = {}

    def fit(self, pool: Pool, train: np.ndarray, val: np.ndarray) -> None:
        self.result = train_network(pool, train, val, self.config, self.card, self.log)
        self.history = self.result.history

    def predict_logits(self, pool: Pool, indices: np.ndarray) -> np.ndarray:
        return predict_logits(
            self.result.net, [pool.images[i] for i in indices], [pool.samples[i].region for i in indices],
            self.card.input, device_for(self.config),
        )
