"""The scikit-learn digits dataset of the reference GAN (`fastattn train --data digits`)."""
import pytest
import torch

from fastattn.models.data import digits_dataset

pytest.importorskip("sklearn")


def test_digits_dataset_is_ten_classes_of_upsampled_grey_digits():
    data = digits_dataset(16)
    assert data.images.shape == (1797, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == tuple("0123456789") and sorted(set(data.labels.tolist())) == list(range(10))
    assert torch.equal(data.images[:, 0], data.images[:, 2])  # grey: the same in every channel
    assert data.images.max() > 200 and data.images.min() == 0
