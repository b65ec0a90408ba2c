"""`vramfit imatrix | quantize | perplexity` as a user runs them, and their one-line errors."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import assert_one_line_error, vramfit
from tests.test_quantize import _first_blocks, write_tiny_llama
from vramfit.gguf import GGUFFile
from vramfit.quant.imatrix import Imatrix, read_dat, write_dat

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def smol2(tmp_path_factory, model_path) -> Path:
    """SmolLM2 cut to its first two blocks: a real tokenizer and real weights, fast to run."""
    path = tmp_path_factory.mktemp("smol") / "smol-2.gguf"
    _first_blocks(GGUFFile(model_path("smollm2-135m")), path, 2)
    return path


def test_imatrix_quantize_perplexity_end_to_end(smol2, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((STDLIB / "textwrap.py").read_text())
    dat = tmp_path / "smol.dat"
    res = vramfit("imatrix", str(smol2), "-f", str(text), "-o", str(dat), "-c", "64", "--chunks", "2")
    assert res.returncode == 0, res.stderr
    im = read_dat(dat)
    assert len(im.values) == 14 and im.chunks == 2 and set(im.ncall.values()) == {2}

    out = tmp_path / "smol-2-q8.gguf"
    res = vramfit("quantize", str(smol2), str(out), "Q8_0", "--imatrix", str(dat))
    assert res.returncode == 0, res.stderr
    assert "Q8_0" in res.stdout and "bpw" in res.stdout and "MiB" in res.stdout
    assert GGUFFile(out).metadata["general.file_type"] == 7

    base = tmp_path / "base.kld"
    res = vramfit("perplexity", str(smol2), "-f", str(text), "-c", "64", "--chunks", "2",
                  "--kl-divergence-base", str(base))  # fmt: skip
    assert res.returncode == 0, res.stderr
    ppl_base = float(re.search(r"PPL = ([\d.]+) \+/- [\d.]+", res.stdout).group(1))
    res = vramfit("perplexity", str(out), "--kl-divergence-base", str(base), "--kl-divergence")
    assert res.returncode == 0, res.stderr
    assert ppl_base > 1 and "Mean PPL(base)" in res.stdout  # the cut model is bad: no value to compare
    assert float(re.search(r"Mean KLD\s*:\s*([\d.]+)", res.stdout).group(1)) < 0.05
    assert float(re.search(r"Same top p\s*:\s*([\d.]+) %", res.stdout).group(1)) > 80


def test_one_line_errors_before_any_work(tmp_path, model_path):
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", model_path("smollm2-135m"))
    other = tmp_path / "other.dat"
    write_dat(Imatrix({"blk.0.attn_q.weight": np.ones(576, np.float32)}), other)
    out = tmp_path / "out.gguf"
    cases = [
        (["quantize", str(tiny), str(out), "IQ4_KS", "--imatrix", str(other)], "another model"),
        (["quantize", str(tiny), str(out), "IQ4_KS", "--custom-q", "attn_v=iq9_zz"], "iq9_zz"),
        (["quantize", str(tiny), str(tmp_path / "nope" / "o.gguf"), "IQ4_KS"], "does not exist"),
        (["quantize", str(tiny), str(out), "Q7_Z"], "unknown quantization type"),
        (["perplexity", str(tiny)], "-f"),
    ]
    for args, needle in cases:
        assert_one_line_error(vramfit(*args), needle)
    assert not out.exists()
