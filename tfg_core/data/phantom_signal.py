"""What a phantom's nodules add to their scan: the excess over the healthy twin, against the case's noise.

When the slice classifier misses a nodule scan (:func:`tfg_core.diagnose.detection_table`), the nodule may be hidden
by the noise or by the anatomy around it (a vessel cross-section, the chest wall). That is a question about the
phantom alone: the healthy twin (:func:`~tfg_core.data.phantom.healthy_twin`) shares the scan's anatomy and noise,
so scan − twin is the nodules' own signal, and its peak over the case's noise σ says how far above the noise the
brightest nodule voxel stands. A nodule many σ above the noise that is still missed is lost in the anatomy, which a
better classifier could learn; one at a few σ is lost in the noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tfg_core.data.phantom import PhantomConfig, generate_case, healthy_twin, parse_series_uid


@dataclass(frozen=True)
class NoduleSignal:
    """The nodules of one phantom case and how far they stand above its noise.

    Args:
        seriesuid: the case's series UID.
        kinds: the nodules' kinds in label order, comma-separated (:data:`~tfg_core.data.phantom_shapes.NODULE_KINDS`).
        kind: the single kind, or ``"several"`` for a case with more than one nodule.
        n_nodules: number of nodules.
        nodule_voxels: voxels of all nodule masks together.
        largest_diameter_mm: the largest nodule's equivalent diameter.
        peak_excess_hu: the largest value of scan − healthy twin (HU): the nodules' brightest voxel over the
            tissue it replaced.
        noise_sigma_hu: σ of the case's Gaussian noise (HU).
        peak_snr: ``peak_excess_hu / noise_sigma_hu``.
    """

    seriesuid: str
    kinds: str
    kind: str
    n_nodules: int
    nodule_voxels: int
    largest_diameter_mm: float
    peak_excess_hu: float
    noise_sigma_hu: float
    peak_snr: float


def nodule_signal(index: int, config: PhantomConfig) -> NoduleSignal:
    """The nodule signal of case ``index`` of the cohort ``config`` describes (the case and its twin regenerated).

    Args:
        index: case number.
        config: the cohort's config (``read_cohort_config`` of its tree).

    Raises:
        ValueError: the case has no nodule.
    """
    case = generate_case(index, config)
    if not case.nodules:
        raise ValueError(f"{case.uid}: case {index} of seed {config.seed} has no nodule")
    # both int16 after the same rounding and clipping; the shared noise cancels
    excess = case.volume.array.astype(np.float32) - healthy_twin(index, config).volume.array.astype(np.float32)
    kinds = [n.kind for n in case.nodules]
    peak = float(excess.max())
    return NoduleSignal(seriesuid=case.uid, kinds=",".join(kinds), kind=kinds[0] if len(kinds) == 1 else "several",
                        n_nodules=len(kinds), nodule_voxels=int(case.nodule_mask.sum()),
                        largest_diameter_mm=max(n.diameter_mm for n in case.nodules), peak_excess_hu=peak,
                        noise_sigma_hu=case.noise_sigma_hu, peak_snr=peak / case.noise_sigma_hu)


def nodule_signal_rows(seriesuids: Iterable[str], config: PhantomConfig, progress: bool = False) -> pd.DataFrame:
    """:func:`nodule_signal` of every listed scan, one row each (about a third of a second a scan).

    Args:
        seriesuids: phantom series UIDs of scans with a nodule, all of ``config``'s seed.
        config: the cohort's config.
        progress: show a progress bar.

    Raises:
        ValueError: a UID is not a phantom UID, or belongs to another seed than ``config``'s.
    """
    uids = list(dict.fromkeys(seriesuids))
    records = []
    for uid in tqdm(uids, desc="nodule signal", disable=not progress):
        seed, index = parse_series_uid(uid)
        if seed != config.seed:
            raise ValueError(f"{uid} is a case of phantom seed {seed}, not of the cohort's seed {config.seed}")
        records.append(asdict(nodule_signal(index, config)))
    return pd.DataFrame.from_records(records, columns=list(NoduleSignal.__dataclass_fields__))
