"""Segmentation scores used by `unet-ext train` and `unet-ext predict`: foreground IoU and Dice of
a binary mask, connected-component instances of a foreground mask, and instance F1 at an IoU
threshold (one-to-one matching of predicted and true instances, as in the cell-tracking and Data
Science Bowl benchmarks). Inputs are numpy arrays (H, W); label 0 is background.
"""
import numpy as np
from scipy import ndimage

__all__ = ["foreground_iou", "dice", "instances", "instance_f1"]


def _binary(mask):
    return np.asarray(mask) > 0


def foreground_iou(pred, truth):
    """|P & T| / |P | T| of the foreground (label > 0); 1.0 when both are empty."""
    p, t = _binary(pred), _binary(truth)
    union = np.count_nonzero(p | t)
    return 1.0 if union == 0 else np.count_nonzero(p & t) / union


def dice(pred, truth):
    """2 |P & T| / (|P| + |T|) of the foreground; 1.0 when both are empty."""
    p, t = _binary(pred), _binary(truth)
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(p & t) / total


def instances(foreground, min_size=0):
    """Instance labels (int32, 1..K) of the 4-connected components of a foreground mask, without
    components smaller than `min_size` pixels (noise specks)."""
    labels, count = ndimage.label(_binary(foreground))
    if min_size > 0 and count:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
        labels, _ = ndimage.label(labels > 0)
    return labels.astype(np.int32)


def _dense(labels):
    """Relabels to 0..K with 0 kept for background, so the contingency table is small."""
    return np.unique(np.concatenate([[0], labels]), return_inverse=True)[1][1:]


def instance_f1(pred_labels, true_labels, threshold=0.5):
    """F1 = 2 TP / (2 TP + FP + FN) where a predicted instance is a true positive when its IoU with
    a true instance exceeds `threshold` (>= 0.5 makes the matching unique). Returns a dict with
    f1, precision, recall, tp, fp, fn and the mean IoU of the matched pairs."""
    if not 0.5 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0.5, 1) so that matches are unique, got {threshold}")
    pred = np.asarray(pred_labels).ravel()
    true = np.asarray(true_labels).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels and true_labels differ in size: {np.shape(pred_labels)} vs "
                         f"{np.shape(true_labels)}")
    pred, true = _dense(pred), _dense(true)
    n_pred, n_true = int(pred.max()) + 1, int(true.max()) + 1
    overlap = np.bincount(pred * n_true + true, minlength=n_pred * n_true).reshape(n_pred, n_true)
    overlap = overlap[1:, 1:]  # background of either side is not an instance
    area_pred = np.bincount(pred, minlength=n_pred)[1:]
    area_true = np.bincount(true, minlength=n_true)[1:]
    union = area_pred[:, None] + area_true[None, :] - overlap
    iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
    matched = iou > threshold
    tp = int(matched.sum())
    fp, fn = len(area_pred) - tp, len(area_true) - tp
    denominator = 2 * tp + fp + fn
    return {
        "f1": 1.0 if denominator == 0 else 2 * tp / denominator,
        "precision": 1.0 if tp + fp == 0 else tp / (tp + fp),
        "recall": 1.0 if tp + fn == 0 else tp / (tp + fn),
        "tp": tp, "fp": fp, "fn": fn,
        "mean_matched_iou": float(iou[matched].mean()) if tp else 0.0,
    }
