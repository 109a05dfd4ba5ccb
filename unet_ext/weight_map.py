"""The U-Net paper's pixel weight map (Ronneberger et al., 2015, eq. 2) from instance labels:

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

with d1, d2 the distances from background pixel x to its nearest and second-nearest cell. It makes
the loss focus on the thin background gaps that separate touching cells."""
import math
import numbers

import numpy as np
from scipy import ndimage

# Border contributions below this fraction of w0 are dropped; that is what makes the map cost
# O(cells * window) instead of O(cells * image).
TOLERANCE = 1e-6


def weight_map(labels, w0=10.0, sigma=5.0, class_weight="balanced"):
    """Weight map of eq. 2 of the U-Net paper for an instance label image.

    Args:
        labels: integer instance labels, 0 = background and 1..K = cells (gaps allowed), shape
            (H, W) or a batch (N, H, W) whose images are treated independently. A numpy array or a
            torch tensor.
        w0: height of the border term (>= 0).
        sigma: width of the border term in pixels (> 0).
        class_weight: w_c, the class-balancing term.
            ``"balanced"``: each pixel gets ``numel / (2 * count of its class)`` with the classes
            background (0) and foreground (> 0) counted per image, so the weights average to 1; in
            an image holding one class only, that class gets 1 (which keeps the average 1).
            ``None``: 1 everywhere. ``(w_background, w_foreground)``: those two numbers.

    Returns:
        float32 weights of the shape of ``labels``: a numpy array for a numpy input, a tensor on
        ``labels``' device for a tensor input (computed on the CPU).

    d1 and d2 are exact Euclidean distances between pixel centres (to the nearest pixel of each
    cell). The border term is 0 on cells and in images with fewer than two cells. Tolerance: the
    term is only computed where d1 + d2 < d_max with ``exp(-d_max**2 / (2 sigma**2)) = 1e-6``; so
    it is exact there, and elsewhere both the true term and ours (0 or a value from a farther
    cell) are below ``1e-6 * w0``, so the result is within ``1e-6 * w0`` of eq. 2 everywhere.
    """
    torch_input = type(labels).__module__.startswith("torch")
    array = labels.detach().cpu().numpy() if torch_input else np.asarray(labels)
    _check(array, w0, sigma)
    class_weight = _check_class_weight(class_weight)
    images = array.reshape((-1,) + array.shape[-2:])
    out = np.stack([_one_image(img, float(w0), float(sigma), class_weight) for img in images])
    out = out.reshape(array.shape)
    if torch_input:
        import torch
        return torch.from_numpy(out).to(labels.device)
    return out


def _check(array, w0, sigma):
    if array.ndim not in (2, 3):
        raise ValueError(f"labels must have shape (H, W) or (N, H, W), got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        # bool is refused too: a binary mask merges touching cells, which is what w0 is about.
        raise ValueError(f"labels must be integer instance labels, got dtype {array.dtype} "
                         "(label a binary mask first, e.g. with scipy.ndimage.label)")
    if array.size and array.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background, 1..K = cells)")
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if not w0 >= 0 or not math.isfinite(w0):
        raise ValueError(f"w0 must be a finite number >= 0, got {w0}")


def _check_class_weight(class_weight):
    if class_weight is None or (isinstance(class_weight, str) and class_weight == "balanced"):
        return class_weight
    if (not isinstance(class_weight, str) and hasattr(class_weight, "__len__")
            and len(class_weight) == 2
            and all(isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0 for v in class_weight)):
        return tuple(float(v) for v in class_weight)
    raise ValueError('class_weight must be "balanced", None or a pair (w_background, w_foreground) '
                     f"of finite numbers >= 0, got {class_weight!r}")


def _one_image(labels, w0, sigma, class_weight):
    foreground = labels > 0
    if class_weight is None:
        w_bg, w_fg = 1.0, 1.0
    elif class_weight == "balanced":
        n_fg = int(foreground.sum())
        n_bg = labels.size - n_fg
        w_bg, w_fg = (labels.size / (2 * n_bg), labels.size / (2 * n_fg)) if n_bg and n_fg else (1.0, 1.0)
    else:
        w_bg, w_fg = class_weight
    out = np.where(foreground, w_fg, w_bg)
    if w0 > 0:
        out += w0 * _border_term(labels, sigma)
    return out.astype(np.float32)


def _border_term(labels, sigma):
    d_max = sigma * math.sqrt(2 * math.log(1 / TOLERANCE))
    # A pixel with d1 + d2 < d_max has both cells within d_max (d1 <= d2), so growing each cell's
    # bounding box by d_max gives every such pixel its exact d1 and d2.
    reach = int(math.ceil(d_max))
    if labels.max(initial=0) > labels.size:  # find_objects allocates one entry per label value
        compact = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
        labels = compact + (labels.min() > 0)  # keep 0 for background only
    labels = labels.astype(np.intp, copy=False)
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    cells = 0
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        cells += 1
        window = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n))
                       for s, n in zip(box, labels.shape))
        d = ndimage.distance_transform_edt(labels[window] != label)
        w1, w2 = d1[window], d2[window]  # views: the updates below write into d1, d2
        np.minimum(w2, np.maximum(w1, d), out=w2)
        np.minimum(w1, d, out=w1)
    term = np.zeros(labels.shape)
    if cells < 2:
        return term
    near = (labels == 0) & np.isfinite(d2)
    term[near] = np.exp(-(d1[near] + d2[near]) ** 2 / (2 * sigma ** 2))
    return term
