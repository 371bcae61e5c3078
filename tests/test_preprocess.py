import numpy as np
import pytest
import torch

from tfg_core.data.folds import fold_split
from tfg_core.data.lungmask import threshold_lung_mask
from tfg_core.data.preprocess import (
    check_finite,
    hu_to_unit,
    model_grid_shape,
    resize_volume,
    to_model_grid,
    to_scan_grid,
    unit_to_hu,
)
from tfg_core.data.slices import make_stacks, slice_labels, stack_indices
from tfg_core.data.volume import Volume
from tfg_core.errors import DataError


def test_hu_window_maps_to_unit_and_back():
    hu = np.array([-3024, -1000, 0, 1000, 3000], dtype=np.int16)
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(unit_to_hu(unit), [-1000, -1000, 0, 1000, 1000])
    assert torch.is_tensor(hu_to_unit(torch.tensor([0.0])))


def test_model_grid_is_multiple_of_32():
    assert model_grid_shape((133, 512, 512)) == (128, 512, 512)
    assert model_grid_shape((11, 512, 512)) == (32, 512, 512)
    assert all(s % 32 == 0 for s in model_grid_shape((77, 300, 301)))


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_resize_keeps_physical_box_and_implied_spacing(direction):
    vol = Volume(np.zeros((20, 50, 70), np.float32), spacing=(2.5, 0.7, 0.6), origin=(10, -20, 30), direction=direction)
    out = resize_volume(vol, (32, 64, 64))
    np.testing.assert_allclose(out.spacing, (2.5 * 20 / 32, 0.7 * 50 / 64, 0.6 * 70 / 64))
    corner = [-0.5, -0.5, -0.5]
    np.testing.assert_allclose(out.voxel_to_world(corner), vol.voxel_to_world(corner), atol=1e-9)
    far = np.asarray(out.shape) - 0.5
    np.testing.assert_allclose(out.voxel_to_world(far), vol.voxel_to_world(np.asarray(vol.shape) - 0.5), atol=1e-9)


def test_model_grid_round_trip_keeps_a_blob():
    arr = np.full((20, 50, 70), -850, np.int16)
    arr[8:12, 20:30, 30:40] = 40
    vol = Volume(arr, spacing=(2.5, 0.7, 0.6))
    grid = to_model_grid(vol)
    assert grid.shape == (32, 64, 64) and 0 <= grid.array.min() and grid.array.max() <= 1
    back = to_scan_grid(grid.array, vol)
    assert back.shape == vol.shape
    assert back[10, 25, 35] > 0.45 and back[2, 5, 5] < 0.1
    mask = to_scan_grid((grid.array > 0.3).astype(np.uint8), vol, mode="nearest")
    assert mask.dtype == np.uint8 and abs(int(mask.sum()) - 4 * 10 * 10) < 0.5 * 400


def test_nan_voxels_rejected_with_file_name():
    arr = np.zeros((3, 4, 4), np.float32)
    arr[1, 1, 1] = np.nan
    arr[2, 2, 2] = np.inf
    with pytest.raises(DataError, match=r"scan\.mhd: 2 voxels are NaN or inf"):
        check_finite(Volume(arr, spacing=(1, 1, 1), source="scan.mhd"))


def test_stack_indices_replicate_edges():
    idx = stack_indices(depth=5, centres=[0, 2, 4], n_slices=9)
    assert idx.tolist()[0] == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    assert idx.tolist()[2] == [0, 1, 2, 3, 4, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        stack_indices(5, [0], n_slices=8)
    with pytest.raises(IndexError):
        stack_indices(5, [5])


def test_stacks_centre_channel_and_gradient():
    vol = torch.arange(12 * 4 * 4, dtype=torch.float32).reshape(12, 4, 4).requires_grad_(True)
    stacks = make_stacks(vol, centres=[3, 7])
    assert stacks.shape == (2, 9, 4, 4)
    assert torch.equal(stacks[0, 4], vol[3]) and torch.equal(stacks[1, 0], vol[3])
    stacks.sum().backward()
    # slice 3: centre of one stack, first channel of the other; slice 0 replicated twice at the edge
    assert vol.grad[3, 0, 0] == 2 and vol.grad[0, 0, 0] == 2 and vol.grad[11, 0, 0] == 1
    assert make_stacks(vol.detach(), size=8).shape == (12, 9, 8, 8)


def test_slice_labels():
    mask = np.zeros((6, 3, 3), bool)
    mask[2, 1, 1] = mask[3, 0, 0] = True
    assert slice_labels(mask).tolist() == [False, False, True, True, False, False]


def test_threshold_lung_mask_finds_two_lungs_not_outside_air():
    arr = np.full((10, 60, 80), -1000, np.int16)  # outside air
    arr[:, 5:55, 5:75] = 40  # body
    arr[:, 15:45, 12:35] = -850  # right lung
    arr[:, 15:45, 45:68] = -850  # left lung
    arr[4:6, 28:32, 20:24] = 30  # a nodule: a hole to fill
    mask = threshold_lung_mask(Volume(arr, spacing=(2.5, 1.0, 1.0)))
    assert mask[:, 30, 25].all() and mask[:, 30, 55].all()
    assert mask[5, 30, 22]  # the nodule is inside the lung mask
    assert not mask[:, 2, 2].any() and not mask[:, 30, 40].any()


def test_fold_split_follows_luna16_subsets():
    import pandas as pd

    manifest = pd.DataFrame({"seriesuid": [f"s{i}" for i in range(30)], "subset": [i % 10 for i in range(30)]})
    split = fold_split(manifest, fold=9)
    assert split.test == ["s19", "s29", "s9"] and split.val == ["s0", "s10", "s20"]
    assert len(split.train) == 24 and not set(split.train) & (set(split.val) | set(split.test))
    with pytest.raises(ValueError):
        fold_split(manifest, 10)


def test_flipped_scan_is_reoriented_for_the_model_and_back():
    """A LUNA16-style flipped scan: the model sees LPS anatomy; results return to the stored orientation."""
    from tfg_core.data.preprocess import orientation_code, reorient

    arr = np.full((8, 40, 48), -850, np.int16)
    arr[3:5, 5:9, 30:36] = 40  # a blob in stored index space
    flipped = Volume(arr, spacing=(2.5, 0.8, 0.7), origin=(100.0, 80.0, -200.0), direction=np.diag([-1.0, -1.0, 1.0]))
    assert orientation_code(flipped) == "RAS"
    canonical = reorient(flipped)
    assert orientation_code(canonical) == "LPS" and canonical.shape == flipped.shape
    blob_world = flipped.voxel_to_world(np.argwhere(arr > 0).mean(axis=0))
    np.testing.assert_allclose(canonical.voxel_to_world(np.argwhere(canonical.array > 0).mean(axis=0)), blob_world)
    np.testing.assert_array_equal(canonical.array, arr[:, ::-1, ::-1])
    grid = to_model_grid(flipped, shape=(32, 64, 64))
    back = to_scan_grid((grid.array > 0.45).astype(np.uint8), flipped, mode="nearest")
    assert back.shape == flipped.shape
    np.testing.assert_allclose(np.argwhere(back > 0).mean(axis=0), np.argwhere(arr > 0).mean(axis=0), atol=0.6)


def test_label_resize_is_centre_aligned():
    """A box on slices 8–11 of 16 goes to slices 4–5 of 8 and back, with no half-voxel drift."""
    labels = np.zeros((16, 4, 4), np.uint8)
    labels[8:12] = 1
    vol = Volume(labels, spacing=(1.0, 1.0, 1.0))
    down = resize_volume(vol, (8, 4, 4), mode="nearest")
    assert np.flatnonzero(down.array[:, 0, 0]).tolist() == [4, 5]
    up = resize_volume(down, (16, 4, 4), mode="nearest")
    np.testing.assert_array_equal(up.array, labels)
