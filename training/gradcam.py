"""Grad-CAM heatmaps (Selvaraju et al. 2017) on the last convolution of the backbone.

Used to spot shortcut learning: heat on side markers, labels or collimator borders instead of bone.
In patches mode each grid patch gets its own map, pasted back at its position on the working image,
so the figure also shows WHERE serving looks (patch boxes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from osteogate.model.card import InputSpec
from osteogate.model.preprocess import letterbox, normalize, patch_positions, resize_long_side
from osteogate.model.taxonomy import CLASSES
from osteogate.training.networks import region_rows
from torch import nn


def last_conv(net: nn.Module) -> nn.Conv2d:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("network has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(net: nn.Module, x: torch.Tensor, region: int, class_index: int) -> np.ndarray:
    """[N, C, H, W] input -> [N, H, W] maps in [0, 1] for `class_index` of the region head."""
    layer = last_conv(net)
    store: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out)),
        layer.register_full_backward_hook(lambda _m, _gi, go: store.__setitem__("grad", go[0])),
    ]
    try:
        net.eval()
        net.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)  # full backward hooks need a grad path from the input
        logits = region_rows(net(x), torch.full((x.shape[0],), region, device=x.device))
        logits[:, class_index].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    weights = store["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * store["act"]).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam.detach().cpu().numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return cam / np.maximum(peak, 1e-8)


def image_heatmap(net: nn.Module, image: np.ndarray, spec: InputSpec, region: int, class_index: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(display image, heatmap of the same shape, patch corners) for one float [0, 1] image."""
    device = next(net.parameters()).device
    if spec.mode == "whole":
        shown = letterbox(resize_long_side(image, spec.size), spec.size)
        cam = grad_cam(net, torch.from_numpy(normalize(shown, spec)).to(device), region, class_index)[0]
        return shown, cam, []
    shown = resize_long_side(image, spec.working_size)
    corners = patch_positions(shown, spec)
    p = spec.patch_size
    patches = np.stack([shown[y : y + p, x : x + p] for y, x in corners])
    cams = grad_cam(net, torch.from_numpy(normalize(patches, spec)).to(device), region, class_index)
    heat = np.zeros_like(shown)
    for (y, x), cam in zip(corners, cams, strict=True):
        heat[y : y + p, x : x + p] = np.maximum(heat[y : y + p, x : x + p], cam)
    return shown, heat, corners


@torch.no_grad()
def predicted_class(net: nn.Module, image: np.ndarray, spec: InputSpec, region: int) -> int:
    from osteogate.model.preprocess import prepare

    device = next(net.parameters()).device
    x = torch.from_numpy(prepare(image, spec)).to(device)
    logits = region_rows(net(x), torch.full((x.shape[0],), region, device=device))
    return int(torch.softmax(logits, dim=-1).mean(dim=0).argmax())


def plot_gradcam(
    path: Path, net: nn.Module, images: Sequence[np.ndarray], titles: Sequence[str], spec: InputSpec,
    regions: Sequence[int], class_index: int | None = None, classes: Sequence[str] = CLASSES,
) -> Path:
    """Grid of overlays for `class_index`, or (None) for each image's most probable class.

    Grad-CAM keeps only positive evidence (ReLU): a class the network argues against gets an empty
    map, so the default explains what the model actually predicts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title, region in zip(axes.ravel(), images, titles, regions, strict=False):
        target = class_index if class_index is not None else predicted_class(net, image, spec, region)
        shown, heat, corners = image_heatmap(net, image, spec, region, target)
        title = f"{title}\nmap: {classes[target]}" + ("" if heat.max() > 0 else " (no positive evidence)")
        ax.imshow(shown, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35 * (heat > 0.05))
        for y, x in corners:
            ax.add_patch(Rectangle((x, y), spec.patch_size, spec.patch_size, fill=False, edgecolor="lime", linewidth=0.6))
        ax.set_title(title, fontsize=8)
    fig.suptitle("Grad-CAM on each serving patch (green boxes)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
