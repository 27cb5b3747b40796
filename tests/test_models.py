"""lowalign.models: reading a model's full-precision weights from safetensors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lowalign.models import safetensors_reader


def _maps(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


@pytest.mark.parametrize("sharded", [False, True])
def test_reader_returns_float32_copies_and_keeps_no_map_of_the_file(sharded, tmp_path):
    """Every dtype a checkpoint stores comes back as float32 equal to safetensors' own reading, from one file
    or a sharded index; no memory map of the file is left behind (its pages would stay in the resident set:
    405 MiB of SmolLM2 during a GPTQ calibration)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 7, generator=g), "b.weight": torch.randn(3, 4, generator=g).bfloat16(),
               "c.weight": torch.randn(6, generator=g).half(), "d.scalar": torch.tensor(2.5),
               "e.empty": torch.zeros(0, 3)}
    if sharded:
        names = sorted(tensors)
        parts = {"model-1.safetensors": names[:2], "model-2.safetensors": names[2:]}
        for f, keys in parts.items():
            save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
        index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    read = safetensors_reader(str(tmp_path))
    for k, t in tensors.items():
        got = read(k)
        assert got.dtype == torch.float32 and got.shape == t.shape and torch.equal(got, t.float()), k
    assert read("missing.weight") is None
    assert not any(_maps(p) for p in tmp_path.glob("*.safetensors"))


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    read = safetensors_reader(str(tmp_path))
    f.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        read("w")
