"""The cohort inventory: one row per scan with its facts, and a named error row for a damaged scan."""

import pandas as pd
import pytest

from tfg_core.data.inventory import fold_table, inventory
from tfg_core.data.luna16 import read_annotations
from tfg_core.data.phantom import PhantomConfig, write_cohort
from tfg_core.errors import DataError
from tfg_core.training.run import ensure_manifest


@pytest.fixture
def cohort(tmp_path):
    root = write_cohort(tmp_path / "phantom", PhantomConfig(n_cases=20))
    manifest, _ = ensure_manifest(root)
    return root, manifest, read_annotations(root / "annotations.csv")


def test_inventory_rows_match_the_cohort(cohort):
    root, manifest, annotations = cohort
    table = inventory(root, manifest, annotations)
    assert list(table.seriesuid) == list(manifest.seriesuid) and (table.error == "").all()
    nodules = pd.read_csv(root / "nodules.csv")
    per_scan = annotations.groupby("seriesuid").size()
    assert table.set_index("seriesuid").n_nodules.to_dict() == {u: int(per_scan.get(u, 0)) for u in manifest.seriesuid}
    with_nodule = table[table.n_nodules > 0]
    assert (with_nodule.nodule_voxels > 0).all() and (with_nodule.positive_slices > 0).all()
    assert (table[table.n_nodules == 0].positive_slices == 0).all()
    assert set(table.model_grid) == {"32x64x64"} and (table.lung_fraction > 0).all() and len(nodules)

    folds = fold_table(table, fold=3)
    assert list(folds.index) == ["train", "val", "test"] and folds.scans.sum() == len(table)
    assert folds.loc["test", "scans"] == (table.subset == 3).sum() and folds.loc["val", "scans"] == (table.subset == 4).sum()
    assert folds.positive_slices.sum() == table.positive_slices.sum()


def test_damaged_scan_is_a_named_row_not_a_crash(cohort):
    root, manifest, annotations = cohort
    victim = manifest.iloc[4]
    raw = root / str(victim.path).replace(".mhd", ".raw")
    raw.write_bytes(raw.read_bytes()[:1000])  # truncated download
    table = inventory(root, manifest, annotations)
    bad = table.set_index("seriesuid").loc[victim.seriesuid]
    assert raw.name in bad.error or victim.seriesuid in bad.error
    assert (table.error != "").sum() == 1  # the others are read
    assert fold_table(table, 0).scans.sum() == len(table) - 1
    with pytest.raises(DataError):
        inventory(root, manifest, annotations, uids=[victim.seriesuid], on_error="raise")
