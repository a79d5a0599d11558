"""State-dict sources that are not flat tensor dicts get a one-line error naming the file."""

import numpy as np
import pytest

from fdl.interop import StateDictFileError, load_state_dict


def test_plain_files_round_trip(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.ones(3, np.float32))
    assert load_state_dict(tmp_path / "w.npz")["a"].tolist() == [1, 1, 1]


def test_bad_npz_safetensors_and_mappings(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(StateDictFileError, match="x.npz"):
        load_state_dict(tmp_path / "x.npz")
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(StateDictFileError, match="x.safetensors"):
        load_state_dict(tmp_path / "x.safetensors")
    with pytest.raises(StateDictFileError, match="entry 'name' is a str"):
        load_state_dict({"w": np.ones(2), "name": "resnet"})
    with pytest.raises(StateDictFileError, match="entry 'b' is a NoneType"):
        load_state_dict({"b": None})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict(tmp_path / "nope.pt")


def test_torch_files_that_are_not_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(StateDictFileError, match=r"list.pt' holds a list, not a state dict"):
        load_state_dict(path)
    torch.save(torch.nn.Linear(2, 3), tmp_path / "module.pt")
    with pytest.raises(StateDictFileError, match=r"module.pt.*weights_only") as e:
        load_state_dict(tmp_path / "module.pt")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02 not a pickle")
    with pytest.raises(StateDictFileError, match="junk.pt"):
        load_state_dict(tmp_path / "junk.pt")
    torch.save({"model": {"fc.weight": torch.ones(2, 2)}, "epoch": 3}, tmp_path / "ck.pt")
    assert list(load_state_dict(tmp_path / "ck.pt")) == ["fc.weight"]
    torch.save({"fc.weight": torch.ones(2), "config": {"lr": 0.1}}, tmp_path / "mixed.pt")
    with pytest.raises(StateDictFileError, match="mixed.pt.*entry 'config' is a nested"):
        load_state_dict(tmp_path / "mixed.pt")
