"""CAM localisation loss: teach the heatmap the node shows to point at the lesion.

A classifier trained with image labels alone is free to find its evidence anywhere: on the
synthetic phantoms the bundled model's CAM marked the lung around a nodule, or the aerated
lung above an effusion, and its peak fell inside the lesion box for half of the lesions
only.
Where the training data has lesion masks (the synthetic phantoms do), this loss supervises the
map itself.

The map supervised is the one the node draws (:mod:`acwi_node.inference.analyser`): for an
image of finding class ``k``, ``cam_k - cam_ref`` with ``ref`` the normal class, computed with
the evaluation-mode CAM weights (``W_eff = classifier.weight @ to_mu.weight``, the same linear
map the network's logits use). Over the ``h x w`` feature cells it is read as a distribution,
``p = softmax(map / temperature)``, and the target ``q`` is the lesion's share of each cell
(the mask area-pooled to the feature grid, normalised to sum 1). The loss is the cross-entropy
``-sum(q log p)``, averaged over the batch's lesion images: it pulls the map's mass, and so its
peak, into the lesion's cells. The node shows the map divided by its peak, so a map that is
highest on the lesion but nearly as high over the whole lung still reads as "the whole lung";
``outside_weight`` adds the share of the map's positive part that lies in cells holding none of
the lesion, ``sum(relu(map) * [q = 0]) / sum(relu(map))``, which is what the viewer sees as
hot outside the lesion (scale-free, like the picture). Images without a finding, or whose
mask is empty (a shift moved the lesion out of view), contribute nothing. The logits are
untouched: this is an extra training term, and the weights, the exported graphs and the
node's inference are the same shape as without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _lesion_maps(
    cam_weights: Tensor, features: Tensor, targets: Tensor, masks: Tensor, normal_index: int
) -> tuple[Tensor, Tensor]:
    """``(shown, share)`` of the lesion images, each ``(n, h*w)``: the map the node draws and
    the lesion's share of each feature cell."""
    h, w = int(features.shape[-2]), int(features.shape[-1])
    share = F.adaptive_avg_pool2d(masks.to(features.dtype), (h, w)).flatten(1)  # (B, h*w)
    keep = (targets != normal_index) & (share.sum(1) > 0)
    diff = cam_weights[targets[keep]] - cam_weights[normal_index]  # (n, C)
    shown = torch.einsum("nc,nchw->nhw", diff, features[keep]).flatten(1)
    return shown, share[keep]


def cam_localisation_loss(
    cam_weights: Tensor,
    features: Tensor,
    targets: Tensor,
    masks: Tensor,
    normal_index: int,
    temperature: float = 1.0,
    outside_weight: float = 0.0,
) -> Tensor:
    """Cross-entropy between the shown map's spatial softmax and the lesion mask, plus
    ``outside_weight`` times the share of the map's positive part outside the lesion.

    ``cam_weights`` is ``W_eff`` ``(K, C)``; ``features`` ``(B, C, h, w)``; ``targets`` the
    class indices ``(B,)``; ``masks`` ``(B, 1, H, W)`` in {0, 1} at the input resolution.
    Returns a scalar (zero, still in the graph, when no image of the batch has a lesion).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    shown, share = _lesion_maps(cam_weights, features, targets, masks, normal_index)
    if shown.shape[0] == 0:
        return features.sum() * 0.0
    target = share / share.sum(1, keepdim=True)
    log_p = F.log_softmax(shown / temperature, dim=1)
    loss = -(target * log_p).sum(1).mean()
    if outside_weight > 0:
        positive = F.relu(shown)
        outside = (positive * (share == 0)).sum(1) / positive.sum(1).clamp_min(1e-6)
        loss = loss + outside_weight * outside.mean()
    return loss


def peak_in_lesion(
    cam_weights: Tensor, features: Tensor, targets: Tensor, masks: Tensor, normal_index: int
) -> Tensor:
    """Per lesion image, whether the shown map's peak cell holds any of the lesion: ``(n,)``
    bool, the pointing game on the feature grid (for validation)."""
    shown, share = _lesion_maps(cam_weights, features, targets, masks, normal_index)
    return share.gather(1, shown.argmax(1, keepdim=True)).squeeze(1) > 0
