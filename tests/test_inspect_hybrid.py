"""`vramfit inspect` on Qwen3.5 files: the 27B layout from `make-random --arch qwen35 --preset 27b`'s
tensor table (a sparse file: the real header, the 14 GiB of data left as a hole) and a written tiny
model: layer count, attention / recurrent layer split and the tensor table."""

from __future__ import annotations

import pytest

from vramfit.cli import main
from vramfit.gguf import GGUFFile, GGUFWriter, type_by_name
from vramfit.model.random_model import random_model_spec


class _Hole:
    """Tensor data that is never written: only its size is laid out."""

    def __init__(self, size: int):
        self.size = size


def write_sparse(spec, path) -> None:
    """A GGUF whose header is complete and whose tensor data is a hole of the right length."""
    w = GGUFWriter(path)
    for key, value in spec.metadata.items():
        w.add(key, value)
    for t in spec.tensors:
        w.tensors.append((t.name, t.shape, type_by_name(t.type), _Hole(t.nbytes)))
    with open(path, "wb") as f:
        w._write_header(f)
        data = sum(h.size + (-h.size % w.alignment) for *_, h in w.tensors)
        f.truncate(f.tell() + data)


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the tensor table unabridged


def test_inspect_27b_reports_64_layers_16_attention(tmp_path, capsys, wide):
    spec = random_model_spec("qwen35", "27b", "iq4_ks")
    path = tmp_path / "qwen35-27b.gguf"
    write_sparse(spec, path)
    assert GGUFFile(path).tensors["output.weight"].shape == (248320, 5120)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "64 layers: 16 attention (3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63)" in text
    assert "48 recurrent (Gated DeltaNet)" in text
    assert f"{len(spec.tensors)} tensors" in text
    table = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") == 6}
    assert len([n for n in table if n.startswith("blk.")]) == len(spec.tensors) - 3
    assert "Q6_K" in table["output.weight"] and "[5120, 248320]" in table["output.weight"]
    assert "F32" in table["blk.0.ssm_conv1d.weight"] and "[4, 10240]" in table["blk.0.ssm_conv1d.weight"]
    assert "Q8_0" in table["blk.0.ssm_alpha.weight"] and "[5120, 48]" in table["blk.0.ssm_alpha.weight"]
    assert "[5120, 12288]" in table["blk.63.attn_q.weight"] and "blk.63.ssm_a" not in table


def test_inspect_tiny_written_model(tmp_path, capsys, wide):
    path = tmp_path / "tiny.gguf"
    assert main(["make-random", "--arch", "qwen35", "--preset", "tiny", "--type", "Q8_0", str(path)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "4 layers: 1 attention (3), 3 recurrent (Gated DeltaNet)" in text
    assert "blk.2.ssm_beta.weight" in text and "blk.3.attn_k_norm.weight" in text
