"""Training scans as the guidance shows them to the classifier: the flow's clean estimates x̂ of each scan.

Why: the guidance reads the classifier on the clean estimate x̂ = z + v·t/1000 of the flow's latent, which is
blurrier than the inputs the classifier was fine-tuned on; on the phantoms it then also calls nodule-like vessel
cross-sections nodules and the guidance darkens them (``docs/measurement_log.md``). Fine-tuning on x̂ views of the
training scans as well — same weak slice labels, since the unguided estimate keeps the nodule where it was — lets the
classifier learn the difference on the images it is asked about. Only image-level labels are used, as before.
Measured on five phantom cohorts, it did not guide better than the shipped recipe, so it is off by default: x̂ at the
demo's guided steps is nearly the autoencoder's reconstruction (``docs/measurement_log.md``).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tfg_core.flow.base import FlowModel
from tfg_core.flow.schedule import clean_estimate, invert
from tfg_core.training.slice_data import SliceCase


@torch.no_grad()
def clean_estimate_volumes(flow: FlowModel, volume: np.ndarray, steps: Sequence[int], num_steps: int = 30,
                           device: str | torch.device = "cpu") -> dict[int, np.ndarray]:
    """The decoded clean estimate of one scan at each requested sampling step of the unguided inversion.

    The scan is encoded and inverted as :func:`tfg_core.guidance.guide` inverts it (backward Euler on the flow's
    ``num_steps`` grid), once down to the earliest requested step; at each requested step ``i`` the velocity is
    taken at ``(z_i, grid[i])``, as the first update of guided step ``i`` takes it, and x̂ is decoded.

    Args:
        flow: the rectified-flow prior (eval mode).
        volume: (z, y, x) image in [0, 1] on the flow's grid.
        steps: sampling step indices in ``[0, num_steps)``.
        num_steps: sampling grid length.
        device: where the flow lives (the estimates come back as CPU arrays).

    Returns:
        step index → (z, y, x) float32 clean estimate, clipped to [0, 1] like the inputs.
    """
    wanted = sorted(set(int(s) for s in steps))
    if not wanted:
        return {}
    if wanted[0] < 0 or wanted[-1] >= num_steps:
        raise ValueError(f"steps must lie in [0, {num_steps}), got {list(steps)}")
    x = torch.as_tensor(np.asarray(volume, dtype=np.float32), device=device)[None, None]
    z = flow.encode(x)
    grid = flow.timesteps(num_steps, latent_shape=tuple(z.shape))
    latents = {}
    for k, (_, z) in enumerate(invert(flow.velocity, z, grid, wanted[0])):  # steps num_steps - 1 down to wanted[0]
        if num_steps - 1 - k in wanted:
            latents[num_steps - 1 - k] = z
    out = {}
    for index in wanted:
        t = grid[index]
        x_hat = flow.decode(clean_estimate(latents[index], flow.velocity(latents[index], t), t))[0, 0]
        out[index] = x_hat.clamp(0.0, 1.0).float().cpu().numpy()
    return out


def view_step(uid: str, steps: Sequence[int], seed: int = 0) -> int:
    """The sampling step of a scan's clean-estimate view: drawn from ``steps`` by a hash of ``(seed, uid)``, so a
    scan gets the same view in every fold it trains in, whatever the order of the scans (views can be cached).

    Args:
        uid: series identifier.
        steps: the sampling steps to draw from.
        seed: selects another draw.
    """
    if not steps:
        raise ValueError("a clean-estimate view needs at least one sampling step")
    return int(list(steps)[zlib.crc32(f"{seed}:{uid}".encode()) % len(steps)])


def clean_estimate_cases(cases: Sequence[SliceCase], flow: FlowModel, steps: Sequence[int], seed: int = 0,
                         num_steps: int = 30, cache: dict[str, SliceCase] | None = None,
                         device: str | torch.device = "cpu", progress: bool = False) -> list[SliceCase]:
    """One clean-estimate view of every scan, at a sampling step drawn per scan from ``steps`` (:func:`view_step`).

    One view per scan (not one per step) keeps inputs and views one to one in the training set, so the classifier
    still sees the inputs it is calibrated and evaluated on half of the time.

    Args:
        cases: training scans.
        flow: the rectified-flow prior.
        steps: the guided sampling steps to draw from (e.g. the demo's 24–28).
        seed: seeds the draw of each scan's step.
        num_steps: sampling grid length.
        cache: views computed before, by view uid; new views are added to it (one dict for all folds of a cohort
            saves recomputing a scan's view in every fold; only valid for one flow).
        device: where the flow lives.
        progress: progress bar.

    Returns:
        the views, in ``cases`` order; uid ``"<uid>@xhat<step>"``, labels and nodule counts of the scan.
    """
    cache = cache if cache is not None else {}
    views = []
    for case in tqdm(cases, desc="clean estimates", disable=not progress):
        step = view_step(case.uid, steps, seed)
        name = f"{case.uid}@xhat{step}"
        if name not in cache:
            x_hat = clean_estimate_volumes(flow, case.volume, [step], num_steps, device)[step]
            if x_hat.shape != case.volume.shape:
                raise ValueError(f"{case.uid}: the flow decoded shape {x_hat.shape} from a scan of shape "
                                 f"{case.volume.shape}; the scan is not on the flow's grid")
            cache[name] = SliceCase(uid=name, volume=x_hat, labels=case.labels, nodule_voxels=case.nodule_voxels)
        views.append(cache[name])
    return views
