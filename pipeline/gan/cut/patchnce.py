"""PatchNCE (CUT's contrastive loss): each output patch's embedding must pick the input patch at the same
position out of the other sampled positions of the same image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_nce(feat_q: Tensor, feat_k: Tensor, batch: int, temperature: float = 0.07) -> Tensor:
    """Per-row loss of the reference's `PatchNCELoss` (reduction none): (B*P,) cross-entropies.

    Args:
        feat_q: (B*P, D) query embeddings (of the output image); gradients flow through them.
        feat_k: (B*P, D) key embeddings (of the input image, at the same positions); detached here.
        batch: images B in this call, so negatives come only from the same image (the reference reshapes by its
            batch size; under DDP that is this rank's batch).
        temperature: the logits' divisor (0.07).

    Row i of image b: logits [q_i.k_i, q_i.k_j for j = 1..P] / T with entry j = i set to -10 before dividing,
    the target is class 0 (the positive).
    """
    feat_k = feat_k.detach()
    rows, dim = feat_q.shape
    positive = torch.bmm(feat_q.view(rows, 1, dim), feat_k.view(rows, dim, 1)).view(rows, 1)
    q = feat_q.view(batch, -1, dim)
    k = feat_k.view(batch, -1, dim)
    patches = q.shape[1]
    negative = torch.bmm(q, k.transpose(2, 1))
    diagonal = torch.eye(patches, device=feat_q.device, dtype=torch.bool)[None]
    negative = negative.masked_fill(diagonal, -10.0).view(-1, patches)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(rows, dtype=torch.long, device=feat_q.device), reduction="none")
