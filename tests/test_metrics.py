"""unet_ext.metrics: IoU/Dice on hand-checked masks, connected-component instances, and instance
F1 against a brute-force matching."""
import numpy as np
import pytest

from unet_ext.metrics import dice, foreground_iou, instance_f1, instances


def test_iou_and_dice_by_hand():
    pred = np.zeros((4, 4), int)
    truth = np.zeros((4, 4), int)
    pred[:2, :2] = 1  # 4 pixels
    truth[:2, :3] = 7  # 6 pixels, 4 shared
    assert foreground_iou(pred, truth) == pytest.approx(4 / 6)
    assert dice(pred, truth) == pytest.approx(8 / 10)
    empty = np.zeros((3, 3))
    assert foreground_iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0


def test_instances_are_connected_components_without_small_ones():
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True   # 9 pixels
    mask[5:8, 5:8] = True   # 9 pixels
    mask[0, 7] = True       # 1 pixel speck
    mask[4, 4] = True       # touches (5, 5) only diagonally: 4-connectivity keeps it apart
    labels = instances(mask)
    assert labels.max() == 4 and labels.dtype == np.int32
    cleaned = instances(mask, min_size=2)
    assert cleaned.max() == 2
    assert set(np.unique(cleaned[mask & (cleaned == 0)])) == {0}
    assert np.count_nonzero(cleaned) == 18


def _brute_f1(pred, truth, threshold):
    tp = 0
    for p in np.unique(pred[pred > 0]):
        for t in np.unique(truth[truth > 0]):
            a, b = pred == p, truth == t
            if np.count_nonzero(a & b) / np.count_nonzero(a | b) > threshold:
                tp += 1
    n_pred, n_true = len(np.unique(pred[pred > 0])), len(np.unique(truth[truth > 0]))
    return tp, n_pred - tp, n_true - tp


@pytest.mark.parametrize("seed", range(5))
def test_instance_f1_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40), int)
    pred = np.zeros((40, 40), int)
    for label in range(1, 9):
        y, x = rng.integers(0, 34, 2)
        truth[y:y + 6, x:x + 6] = label * 3  # label gaps
        dy, dx = rng.integers(-3, 4, 2)
        pred[max(y + dy, 0):y + dy + 6, max(x + dx, 0):x + dx + 6] = 100 + label
    result = instance_f1(pred, truth, 0.5)
    tp, fp, fn = _brute_f1(pred, truth, 0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    assert result["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_instance_f1_edge_cases():
    full = np.ones((5, 5), int) * 3  # no background at all
    assert instance_f1(full, full)["f1"] == 1.0
    empty = np.zeros((5, 5), int)
    assert instance_f1(empty, empty)["f1"] == 1.0
    assert instance_f1(empty, full)["fn"] == 1 and instance_f1(empty, full)["f1"] == 0.0
    with pytest.raises(ValueError, match="threshold"):
        instance_f1(full, full, 0.3)
    with pytest.raises(ValueError, match="differ in size"):
        instance_f1(full, np.ones((4, 5), int))
