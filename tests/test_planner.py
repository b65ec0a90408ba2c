"""The memory planner on the Qwen3.5-27B config, with the numbers of shared/docs/qwen35-27b.md typed in
(sections 1.1, 4.1-4.4): KV bytes per token per type, the recurrent state, the community's 16 GiB
recipes (13.0 GiB IQ4_KS mix: 72K tokens of q8_0 KV, 100K of q6_0/q5_0), bad input."""

from __future__ import annotations

import json

import pytest

from vramfit.cli import main
from vramfit.model.random_model import random_model_spec, write_random_model
from vramfit.runtime.planner import (
    CUDA,
    GiB,
    MiB,
    ModelInfo,
    PlanError,
    TensorEntry,
    kv_bytes_per_token,
    parse_size,
    plan,
)

# sokann/Qwen3.5-27B-GGUF-4.151bpw: 12.999 GiB = CUDA0 buffer 12,628.54 MiB + host 682 MiB (token_embd)
EMBED = 682 * MiB
DEVICE_WEIGHTS = int(12628.54 * MiB)
OUTPUT = 682 * MiB  # iq4_k like token_embd (same shape)
PER_LAYER = (DEVICE_WEIGHTS - OUTPUT) // 64


def _27b(tensors=None) -> ModelInfo:
    tensors = tensors or (
        TensorEntry("token_embd.weight", EMBED, None),
        TensorEntry("output.weight", OUTPUT, None),
        *(TensorEntry(f"blk.{i}.ffn_up.weight", PER_LAYER, i) for i in range(64)),
    )
    return ModelInfo(
        name="qwen3.5-27b", n_layer=64, n_embd=5120, n_ff=17408, n_head=24, n_head_kv=4, head_dim=256,
        n_vocab=248320, n_ctx_train=262144, kv_layers=16, state_bytes=round(149.6 * MiB), tensors=tensors,
        dn_v_heads=48, dn_head_dim=128, dn_channels=10240,
    )  # fmt: skip


@pytest.mark.parametrize(
    "k, v, per_token",
    [("f16", "f16", 65536), ("q8_0", "q8_0", 34816), ("q8_0", "q6_0", 30720), ("q6_0", "q5_0", 24576),
     ("q4_0", "q4_0", 18432)],
)  # fmt: skip
def test_kv_bytes_per_token_match_the_doc_table(k, v, per_token):
    assert kv_bytes_per_token(_27b(), k, v) == per_token


def test_16gib_plan_reaches_the_community_contexts():
    p = plan(_27b(), 16 * GiB, "max", "auto")
    assert p.fits and (p.k_type, p.v_type) == ("q8_0", "q8_0")
    assert p.ctx >= 72000
    assert p.device_total <= 16 * GiB
    assert p.item("weights").device_bytes == OUTPUT + 64 * PER_LAYER  # token_embd stays in host memory
    assert p.item("weights").host_bytes == EMBED
    assert p.item("kv cache").device_bytes == 34816 * p.ctx
    assert p.item("recurrent state").device_bytes == round(149.6 * MiB)
    max_ctx = {(o.k, o.v): o.max_ctx for o in p.kv_options}
    assert max_ctx[("q6_0", "q5_0")] >= 100000  # the other community recipe
    assert max_ctx[("f16", "f16")] < max_ctx[("q8_0", "q8_0")] < max_ctx[("q4_0", "q4_0")]
    # what is left for the KV cache is what the table does not spend elsewhere
    room = 16 * GiB - (p.device_total - p.item("kv cache").device_bytes)
    assert max_ctx[("q8_0", "q8_0")] == room // 34816 // 256 * 256
    assert p.as_dict()["max_ctx"]["q4_0/q4_0"] == max_ctx[("q4_0", "q4_0")]


def test_requested_context_picks_the_best_type_that_holds_it():
    p = plan(_27b(), 16 * GiB, 100000, "auto")
    assert p.fits and (p.k_type, p.v_type) == ("q6_0", "q5_0") and p.ctx == 100000
    p = plan(_27b(), 16 * GiB, 32768, "auto")
    assert (p.k_type, p.v_type) == ("f16", "f16")


def test_two_sequences_double_kv_and_state():
    one, two = plan(_27b(), 16 * GiB, 16384, "q8_0"), plan(_27b(), 16 * GiB, 16384, "q8_0", parallel=2)
    assert two.item("kv cache").device_bytes == 2 * 16384 * 34816
    assert two.item("recurrent state").device_bytes == 2 * one.item("recurrent state").device_bytes


def test_too_little_vram_fails_with_nearest_settings():
    p = plan(_27b(), 8 * GiB, "max", "auto")
    assert not p.fits and p.verdict.startswith("does not fit")
    assert any("--offload" in s for s in p.nearest)
    p = plan(_27b(), 16 * GiB, 200000, "q8_0")
    assert not p.fits
    assert any(s.startswith("--ctx ") for s in p.nearest)  # the largest q8_0 context
    assert any("--ctk q4_0" in s for s in p.nearest)


def test_offload_keeps_output_then_last_layers_in_host_memory():
    p = plan(_27b(), 8 * GiB, "max", "auto", offload=True)
    assert p.fits and p.ctx >= 4096
    assert p.host_tensors[:2] == ["token_embd.weight", "output.weight"]
    assert "blk.63.ffn_up.weight" in p.host_tensors and "blk.0.ffn_up.weight" not in p.host_tensors
    assert p.item("weights").device_bytes + p.item("weights").host_bytes == EMBED + OUTPUT + 64 * PER_LAYER
    assert p.item("stream buffers").device_bytes == 2 * PER_LAYER


def test_context_beyond_training_length_warns():
    p = plan(_27b(), 80 * GiB, 300000, "q8_0")
    assert p.fits and p.ctx == 300000
    assert any("training length 262144" in w for w in p.warnings)


@pytest.mark.parametrize("kv", ["q7_0", "q8_0/int4", "fp8"])
def test_unknown_kv_type(kv):
    with pytest.raises(PlanError, match="unknown KV cache type"):
        plan(_27b(), 16 * GiB, 4096, kv)


def test_kv_type_the_head_size_cannot_use():
    info = ModelInfo("odd", 2, 320, 640, 4, 4, 80, 1000, 4096, kv_layers=2)
    with pytest.raises(PlanError, match="multiple of 32"):
        plan(info, GiB, 1024, "q8_0")
    assert plan(info, GiB, 1024, "f16").fits


def test_parse_size():
    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("12000MiB") == 12000 * 2**20
    assert parse_size("15.5GB") == 15_500_000_000
    with pytest.raises(PlanError):
        parse_size("lots")


def test_random_27b_community_mix_plans_72k_q8_0():
    spec = random_model_spec("qwen35", "27b", "sokann-4.151")
    info = ModelInfo.from_metadata(spec.metadata, [(t.name, t.nbytes, t.type) for t in spec.tensors])
    assert info.kv_layers == 16 and info.state_bytes == pytest.approx(149.6 * MiB, rel=1e-3)
    p = plan(info, 16 * GiB, "max", "auto", device=CUDA)
    assert p.fits and (p.k_type, p.v_type) == ("q8_0", "q8_0") and p.ctx >= 72000


def test_plan_cli(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_random_model(random_model_spec("qwen35", "tiny"), path)
    assert main(["plan", str(path), "--vram", "1GiB", "--ctx", "2048", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["ctx"] == 2048 and set(d["max_ctx"]) >= {"q8_0/q8_0", "f16/f16", "q4_0/q4_0"}
    assert d["items"][1]["what"] == "kv cache" and d["items"][1]["device_bytes"] == 2048 * 512  # f16
    assert main(["plan", str(path), "--vram", "1GiB"]) == 0
    assert "fits: context 4,096" in capsys.readouterr().out  # the whole training context, f16
    assert main(["plan", str(path), "--vram", "100MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vramfit: error: does not fit") and "nearest:" in err[0]
    assert main(["plan", str(path), "--vram", "1GiB", "--ctk", "q7_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    types = "f32, f16, bf16, q8_0, q6_0, q5_0, iq4_nl, q4_0, or auto"
    assert err == [f"vramfit: error: unknown KV cache type 'q7_0' (choose from {types})"]
