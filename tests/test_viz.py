"""Figures are pure drawing functions: check what is drawn, not only that a file appears."""

import matplotlib

matplotlib.use("Agg")

import numpy as np

from tfg_core.viz.comparison import MASK_RGBA, draw_method_comparison, method_comparison_figure, nodule_slice


def _case():
    image = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    gt = np.zeros((6, 16, 16), bool)
    gt[3, 5:9, 5:9] = True
    gt[2, 6:8, 6:8] = True
    good = gt.copy()
    shifted = np.roll(gt, 3, axis=2)
    return ("case-a", image, gt, {"tfg": good, "cam": shifted})


def test_nodule_slice_is_the_largest_cross_section():
    _, _, gt, _ = _case()
    assert nodule_slice(gt) == 3 and nodule_slice(np.zeros((6, 4, 4), bool)) == 3


def test_comparison_draws_each_methods_mask_on_the_nodule_slice():
    import matplotlib.pyplot as plt

    row = _case()
    fig = draw_method_comparison([row, row], ["tfg", "cam", "ig"])
    axes = np.array(fig.axes).reshape(2, 5)
    assert [ax.get_title() for ax in axes[0]] == ["input", "ground truth", "TFG (ours)", "CAM", "Integrated Gradients"]
    for col, method in ((2, "tfg"), (3, "cam")):
        overlay = axes[0, col].get_images()[1].get_array()  # image 0 is the CT slice, 1 the mask overlay
        drawn = np.asarray(overlay)[..., 3] > 0
        assert np.array_equal(drawn, row[3][method][3])  # slice 3, the largest cross-section
        assert np.allclose(np.asarray(overlay)[drawn][0], MASK_RGBA)
    assert len(axes[0, 4].get_images()) == 1  # no mask for "ig": the panel shows the slice only
    assert len(axes[0, 0].get_images()) == 1
    plt.close(fig)


def test_png_is_written(tmp_path):
    path = tmp_path / "methods.png"
    method_comparison_figure([_case()], ["tfg"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_maps_show_each_map_on_the_nodule_slice():
    import matplotlib.pyplot as plt

    from tfg_core.viz.comparison import draw_score_maps

    _, image, gt, _ = _case()
    maps = {"cam": np.arange(6 * 16 * 16, dtype=float).reshape(6, 16, 16), "ig": np.ones((6, 16, 16))}
    fig = draw_score_maps(image, gt, maps, ["cam", "scorecam", "ig"])
    assert [ax.get_title() for ax in fig.axes] == ["input z=3", "CAM", "Integrated Gradients"]
    assert np.array_equal(np.asarray(fig.axes[1].get_images()[0].get_array()), maps["cam"][3])
    plt.close(fig)
