"""Evaluation metrics shared by the server and the clients (docs/method.md "Metrics").

Retrieval scores are dot products of L2-normalised features. For each query the rank of its best
ground truth is counted *pessimistically*: the number of wrong candidates scoring greater than or
equal to the best correct one. Ties therefore count against the query, so collapsed (all-equal)
features score near chance rather than a perfect 100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["retrieval_metrics", "pair_retrieval_metrics", "top1_accuracy", "personalised_accuracy", "held_rows",
           "RECALL_KS"]

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Sequence[int] | Tensor,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@{1,5,10} in both directions, as percentages (0-100).

    Args:
        image_features: (N, d).
        text_features: (M, d); an image may have several captions.
        text_to_image: (M,) index of the image that caption ``j`` describes.
        chunk_size: queries scored at once; peak memory (chunk_size, max(N, M)).

    Returns:
        ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10``; ``rsum`` = the sum of those six;
        ``r1_sum`` = ``i2t_r1 + t2i_r1`` (the paper's "R@1 sum"). Image->text queries are the images
        that have at least one caption (an image with none has no ground truth); every caption is a
        text->image query, and every image is a candidate.
    """
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"expected (N, d) and (M, d) features, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError("image and text features have different widths")
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if n_images == 0 or n_texts == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = image_features.device
    t2i = torch.as_tensor(text_to_image, dtype=torch.long).to(device).reshape(-1)
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_texts} texts")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_images:
        raise ValueError(f"text_to_image indices must lie in [0, {n_images})")

    img = F.normalize(image_features.float(), dim=-1)  # (N, d)
    txt = F.normalize(text_features.float().to(device), dim=-1)  # (M, d)

    # Image -> text: best rank among each image's captions.
    i2t_ranks = []
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        sims = img[start:stop] @ txt.T  # (n, M)
        is_gt = t2i.unsqueeze(0) == torch.arange(start, stop, device=device).unsqueeze(1)  # (n, M)
        best_gt = sims.masked_fill(~is_gt, float("-inf")).max(dim=1).values  # (n,)
        rank = ((sims >= best_gt.unsqueeze(1)) & ~is_gt).sum(dim=1)  # (n,)
        i2t_ranks.append(rank[is_gt.any(dim=1)])
    i2t_rank = torch.cat(i2t_ranks)

    # Text -> image: one ground truth per caption.
    t2i_ranks = []
    for start in range(0, n_texts, chunk_size):
        stop = min(start + chunk_size, n_texts)
        sims = txt[start:stop] @ img.T  # (m, N)
        gt = sims.gather(1, t2i[start:stop].unsqueeze(1))  # (m, 1)
        t2i_ranks.append((sims >= gt).sum(dim=1) - 1)  # minus the ground truth itself
    t2i_rank = torch.cat(t2i_ranks)

    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in RECALL_KS:
            out[f"{direction}_r{k}"] = 100.0 * float((ranks < k).float().mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    out["r1_sum"] = out["i2t_r1"] + out["t2i_r1"]
    return out


@torch.no_grad()
def pair_retrieval_metrics(image_features: Tensor, text_features: Tensor, image_ids: Sequence[int] | Tensor | None
                           ) -> dict[str, float]:
    """retrieval_metrics over rows of image-caption pairs, where rows with one image id show one picture (one row
    per caption; COCO and Flickr30k have five): each picture is one candidate and one image->text query (a hit
    when any of its captions ranks in the top k), each caption one text->image query. image_features,
    text_features: (N, d) per row; image_ids: (N,), None when every row is its own picture."""
    n = image_features.shape[0]
    if image_ids is None:
        return retrieval_metrics(image_features, text_features, torch.arange(n))
    ids = image_ids.long().cpu() if isinstance(image_ids, Tensor) else torch.from_numpy(np.array(image_ids, np.int64))
    ids = ids.reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"image_ids has {ids.numel()} entries for {n} rows")
    unique, text_to_image = torch.unique(ids, return_inverse=True)  # (P,), (N,)
    first_row = torch.full((len(unique),), n, dtype=torch.long).scatter_reduce(
        0, text_to_image, torch.arange(n), reduce="amin")  # (P,): each picture's first row
    return retrieval_metrics(image_features[first_row.to(image_features.device)], text_features, text_to_image)


@torch.no_grad()
def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage (0-100) of rows whose arg-max over (N, K) logits equals the (N,) label."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("top1_accuracy needs at least one sample")
    correct = logits.argmax(dim=1) == labels.to(logits.device)
    return 100.0 * float(correct.float().mean())


def personalised_accuracy(predictions: Tensor, labels: Tensor, train_labels: Tensor, num_classes: int
                          ) -> dict[str, float]:
    """docs/method.md "Personalised metric", as percentages: `top1` on the whole test split; `pers_top1` =
    sum over classes y of p_train(y) * acc(y), the test accuracy weighted to the device's own label
    distribution; `top1_bound` = the share of test samples in classes the device holds, the most its
    full-test top-1 can reach. predictions, labels: (N,) class ids; train_labels: (T,) private labels."""
    if predictions.shape != labels.shape or labels.dim() != 1 or len(labels) == 0:
        raise ValueError(f"expected (N,) predictions and labels, got {tuple(predictions.shape)}, {tuple(labels.shape)}")
    labels, predictions, train_labels = labels.long(), predictions.long().to(labels.device), train_labels.long()
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).float()  # (K,)
    per_class = torch.bincount(labels, minlength=num_classes).float()  # (K,)
    shares = torch.bincount(train_labels.to(labels.device), minlength=num_classes).float()
    shares = shares / shares.sum().clamp(min=1.0)  # p_train (K,)
    # A class the device holds but the test split lacks contributes nothing (acc undefined), and its share
    # is spread over the others: the weights are renormalised over the classes both have.
    tested = per_class > 0
    weights = shares * tested
    accuracy = correct / per_class.clamp(min=1.0)
    return {
        "top1": 100.0 * float(correct.sum() / len(labels)),
        "pers_top1": 100.0 * float((weights * accuracy).sum() / weights.sum().clamp(min=1e-12)),
        "top1_bound": 100.0 * float(per_class[shares > 0].sum() / len(labels)),
    }


def held_rows(test_labels: Tensor, train_labels: Tensor) -> Tensor:
    """Indices of the test rows whose label (category) occurs in the device's private labels."""
    held = torch.isin(test_labels.long(), torch.unique(train_labels.long()))
    return torch.nonzero(held).reshape(-1)
