"""The probe that picks FedCMI's dominant modality, on a case worked by hand."""

import numpy as np
import pytest

from fedafd.benchmarks.modality_probe import nearest_class_mean_top1


def test_nearest_class_mean_by_hand() -> None:
    # Class 3 mean points along x, class 7 along y (labels need not be 0..C-1).
    train = np.array([[2.0, 0.0], [1.0, 0.1], [0.0, 3.0], [0.1, 1.0]])
    labels = np.array([3, 3, 7, 7])
    # Test: [1, 0.2] -> 3 (right), [0.2, 1] -> 7 (right), [0.9, 0.1] labelled 7 -> predicted 3 (wrong).
    test = np.array([[1.0, 0.2], [0.2, 1.0], [0.9, 0.1]])
    assert nearest_class_mean_top1(train, labels, test, np.array([3, 7, 7])) == pytest.approx(200 / 3)
