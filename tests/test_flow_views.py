"""Clean-estimate views of training scans: what the guidance shows the classifier, cached per scan, in fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blob_detector import BlobDetector
from test_guidance import blob_mask, healthy_image, toy_flow
from tfg_core.guidance import GuidanceConfig, guide
from tfg_core.training.finetune import FinetuneConfig
from tfg_core.training.flow_views import clean_estimate_cases, clean_estimate_volumes, view_step
from tfg_core.training.slice_data import SliceCase


def blob_scan() -> torch.Tensor:
    return healthy_image() + 0.7 * blob_mask().float()


@pytest.mark.parametrize("start", [4, 7])
def test_a_view_is_the_clean_estimate_the_first_guided_update_reads(start):
    """x̂ at step i of the unguided inversion equals the image guided step i hands the classifier first."""
    scan = blob_scan()
    trajectory = list(guide(toy_flow(), BlobDetector().eval(), scan,
                            GuidanceConfig(num_steps=10, start_index=start, guided_steps=1)))
    shown = next(s for s in trajectory if s.phase == "guided").x_hat
    views = clean_estimate_volumes(toy_flow(), scan.numpy(), [start, 9, start], num_steps=10)
    assert sorted(views) == sorted({start, 9})
    np.testing.assert_allclose(views[start], shown.clamp(0, 1).numpy(), atol=1e-6)
    assert views[start].dtype == np.float32 and views[start].shape == tuple(scan.shape)
    # several steps from one inversion are the same as one step at a time
    np.testing.assert_array_equal(views[9], clean_estimate_volumes(toy_flow(), scan.numpy(), [9], num_steps=10)[9])
    # and the view is not the input: the prior pulls x̂ towards healthy tissue, the blob fades
    blob = blob_mask().numpy()
    assert views[start][blob].mean() < scan.numpy()[blob].mean() - 0.02
    with pytest.raises(ValueError, match=r"steps must lie in \[0, 10\)"):
        clean_estimate_volumes(toy_flow(), scan.numpy(), [10], num_steps=10)


def test_a_scan_gets_the_same_view_whatever_the_order_and_the_cache_is_reused():
    steps = (4, 5, 6, 7)
    uids = [f"1.2.{i}" for i in range(40)]
    drawn = {uid: view_step(uid, steps) for uid in uids}
    assert {view_step(uid, steps) for uid in reversed(uids)} <= set(steps)
    assert all(view_step(uid, steps) == drawn[uid] for uid in reversed(uids))
    assert len(set(drawn.values())) == len(steps)  # 40 scans spread over all four steps
    assert any(view_step(uid, steps, seed=1) != drawn[uid] for uid in uids)  # another seed, another draw
    with pytest.raises(ValueError, match="at least one sampling step"):
        view_step("1.2.3", ())

    scan = blob_scan().numpy()
    labels = np.zeros(scan.shape[0], dtype=bool)
    labels[6:11] = True
    cases = [SliceCase(uid, scan, labels, labels.astype(int)) for uid in uids[:3]]
    flow, cache = toy_flow(), {}
    views = clean_estimate_cases(cases, flow, steps, num_steps=10, cache=cache)
    assert [v.uid for v in views] == [f"{c.uid}@xhat{drawn[c.uid]}" for c in cases]
    assert all(v.labels is c.labels and v.nodule_voxels is c.nodule_voxels for v, c in zip(views, cases))
    decodes = flow.decodes
    again = clean_estimate_cases(cases[::-1], flow, steps, num_steps=10, cache=cache)  # another fold, other order
    assert flow.decodes == decodes and [v.uid for v in again] == [v.uid for v in views[::-1]]
    assert all(a is b for a, b in zip(again, views[::-1]))

    class CroppingFlow(type(flow)):  # a decoder that returns another grid than the scan's
        def decode(self, z):
            return super().decode(z)[..., :8]

    with pytest.raises(ValueError, match=r"1\.2\.0: the flow decoded shape \(16, 16, 8\) from a scan of shape"):
        clean_estimate_cases(cases[:1], CroppingFlow(healthy_image(), sigma=1.0), steps, num_steps=10)


def test_config_keeps_steps_as_a_tuple_and_refuses_steps_off_the_grid():
    assert FinetuneConfig(clean_estimate_steps=[24, 25]).clean_estimate_steps == (24, 25)
    assert FinetuneConfig().clean_estimate_steps == ()
    with pytest.raises(ValueError, match="clean_estimate_steps"):
        FinetuneConfig(clean_estimate_steps=(30,))


def test_finetune_fold_adds_one_view_per_training_scan_and_records_the_steps(tmp_path):
    from tfg_core.data.phantom import PhantomConfig, write_cohort
    from tfg_core.flow.toy import GaussianToyFlow
    from tfg_core.training.checkpoint import load_predictor
    from tfg_core.training.run import finetune_fold

    root = tmp_path / "phantom"
    write_cohort(root, PhantomConfig(n_cases=20))  # fold 0 trains on 16 scans, validates on 2
    cache: dict = {}
    result = finetune_fold(root, 0, "tiny", out=tmp_path / "tiny.pt", progress=False, iterations=2, eval_every=2,
                           batch_size=8, clean_estimate_steps=(24, 28), flow=GaussianToyFlow(torch.zeros(32, 64, 64)),
                           view_cache=cache)
    assert result["n_train"] == 32 and result["n_val"] == 2  # 16 inputs and their 16 views; validation on inputs
    assert len(cache) == 16 and {uid.rsplit("@xhat", 1)[1] for uid in cache} <= {"24", "28"}
    _, payload = load_predictor(tmp_path / "tiny.pt")
    assert payload["config"]["clean_estimate_steps"] == [24, 28]


def test_cli_finetune_passes_the_clean_estimate_steps(tmp_path, monkeypatch, capsys):
    import tfg_core.training.run as run
    from tfg_core.cli import main

    seen = []

    def fake_finetune_fold(**kwargs):
        seen.append(kwargs)
        return {"best": {"f1": 1.0, "iteration": 1}, "seconds": 1.0, "iterations_per_second": 1.0,
                "checkpoint": str(tmp_path / "x.pt")}

    monkeypatch.setattr(run, "finetune_fold", fake_finetune_fold)
    assert main(["finetune", "--root", str(tmp_path), "--clean-estimate-steps", "24", "28", "--quiet"]) == 0
    assert main(["finetune", "--root", str(tmp_path), "--quiet"]) == 0
    # given: the steps reach the config; not given: None, i.e. the config's default (inputs only)
    assert [kw["clean_estimate_steps"] for kw in seen] == [(24, 28), None]
