import pytest
import torch

from tfg_core.checkpoints import load_checkpoint, load_state_dict_strict, resolve_weights, verify_sha256
from tfg_core.errors import CheckpointError


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


def test_strict_load_lists_every_key_problem():
    net = _net()
    sd = dict(_net().state_dict())
    sd["0.weights"] = sd.pop("0.weight")  # renamed → one missing, one unexpected
    sd["2.weight"] = torch.zeros(1, 5)  # wrong shape
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(net, sd, source="ckpt.pt")
    msg = str(err.value)
    assert "ckpt.pt" in msg and "missing (1)" in msg and "0.weight" in msg
    assert "unexpected (1)" in msg and "0.weights" in msg
    assert "2.weight: checkpoint (1, 5) vs model (1, 4)" in msg


def test_load_checkpoint_weights_only_and_round_trip(tmp_path):
    net = _net()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    other = load_state_dict_strict(_net(), load_checkpoint(path), source=path)
    assert torch.equal(other[0].weight, net[0].weight)
    torch.save({"model": net}, tmp_path / "pickled.pt")  # a whole pickled module: refused by weights_only
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_checkpoint(tmp_path / "pickled.pt")


def test_sha256_mismatch_and_missing_file(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        verify_sha256(path, "0" * 64)
    with pytest.raises(CheckpointError, match="TFG_LITE_MEDSAM"):
        monkeypatch.delenv("TFG_LITE_MEDSAM", raising=False)
        resolve_weights("lite_medsam")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_weights("lite_medsam", tmp_path / "nope.pth")
