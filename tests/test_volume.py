import numpy as np
import pytest
import SimpleITK as sitk

from tfg_core.data.volume import Volume
from tfg_core.errors import DataError

FLIP = np.diag([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("direction", [np.eye(3), FLIP])
def test_world_voxel_transform_matches_simpleitk(direction, rng):
    vol = Volume(np.zeros((7, 11, 13), np.int16), spacing=(2.5, 0.7, 0.8), origin=(-150.0, 120.0, -300.0),
                 direction=direction)
    image = vol.to_sitk()
    for _ in range(5):
        idx_zyx = rng.uniform(0, 6, size=3)
        world = vol.voxel_to_world(idx_zyx)
        expected_world = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx_zyx[::-1]))
        np.testing.assert_allclose(world, expected_world, atol=1e-9)
        back = vol.world_to_voxel(world)
        np.testing.assert_allclose(back, idx_zyx, atol=1e-9)
        np.testing.assert_allclose(back[::-1], image.TransformPhysicalPointToContinuousIndex(tuple(world)), atol=1e-9)


def test_sitk_round_trip_keeps_axis_order():
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    vol = Volume(arr, spacing=(2.5, 0.6, 0.7), origin=(1, 2, 3), direction=FLIP)
    image = vol.to_sitk()
    assert image.GetSize() == (4, 3, 2)  # SimpleITK speaks (x, y, z)
    assert image.GetSpacing() == (0.7, 0.6, 2.5)
    back = Volume.from_sitk(image)
    np.testing.assert_array_equal(back.array, arr)
    assert back.spacing == (2.5, 0.6, 0.7)
    np.testing.assert_array_equal(back.direction, FLIP)
    assert sitk.GetArrayFromImage(image)[1, 2, 3] == arr[1, 2, 3]


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -0.5, 1.0), (1.0, float("nan"), 1.0)])
def test_bad_spacing_is_a_data_error(spacing):
    with pytest.raises(DataError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), spacing=spacing, source="scan.mhd")


def test_not_3d_names_source():
    with pytest.raises(DataError, match="scan.mhd"):
        Volume(np.zeros((2, 2)), spacing=(1, 1, 1), source="scan.mhd")
