import nibabel as nib
import numpy as np

from tfg_core.data.nifti import read_nifti, write_nifti
from tfg_core.data.volume import Volume


def test_nifti_keeps_the_scan_geometry_for_nibabel(tmp_path):
    mask = np.zeros((5, 6, 7), bool)
    mask[2, 3, 4] = True
    vol = Volume(mask, spacing=(2.5, 0.7, 0.8), origin=(100.0, 80.0, -200.0), direction=np.diag([-1.0, -1.0, 1.0]))
    path = write_nifti(vol, tmp_path / "case_mask.nii.gz")
    back = read_nifti(path)
    np.testing.assert_array_equal(back.array, mask.astype(np.uint8))
    np.testing.assert_allclose(back.spacing, vol.spacing)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    # nibabel: array is (x, y, z) and the affine maps to RAS; the marked voxel lands at the same world point
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.shape == (7, 6, 5) and data[4, 3, 2] == 1
    ras = img.affine @ np.array([4, 3, 2, 1.0])
    lps = vol.voxel_to_world([2, 3, 4])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["case_mask.nii.gz"]
