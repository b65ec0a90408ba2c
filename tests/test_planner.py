"""The memory planner on the Qwen3.5-27B config, with the numbers of shared/docs/qwen35-27b.md typed in
(sections 1.1, 4.1-4.4): KV bytes per token per type, the recurrent state, the community's 16 GiB
recipes (13.0 GiB IQ4_KS mix: 72K tokens of q8_0 KV, 100K of q6_0/q5_0), bad input."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from vramfit.cli import main
from vramfit.kernels import cpu as cpu_kernels
from vramfit.kernels import dispatch
from vramfit.model.random_model import random_model_spec, write_random_model
from vramfit.runtime.memory import PAGE
from vramfit.runtime.planner import (
    CPU,
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


# ---- the CPU plan against the engine's real allocations (the shipped small models) ----


def _resident_weights(model, gguf) -> tuple[int, int]:
    """(bytes of the GGUF's tensor data resident in this process: present bits of /proc/self/pagemap,
    bytes of the weights' own copies: the storages outside the mapping that the model's blocks,
    embedding, output and norm hold, walked like a garbage collector would)."""
    buf = np.frombuffer(gguf._buf, dtype=np.uint8)
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    first, last = (lo + gguf.data_offset) // PAGE, (hi - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        present = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64) >> np.uint64(63)
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def walk(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if not lo <= s.data_ptr() < hi:
                storages[s.data_ptr()] = s.nbytes()
        elif isinstance(obj, list | tuple):
            for x in obj:
                walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x)
        elif type(obj).__module__.startswith("vramfit") and hasattr(obj, "__dict__"):
            walk(vars(obj))

    walk([model.blocks, model.embed, model.output, model.norm])
    return int(present.sum()) * PAGE, sum(storages.values())


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_cpu_weights_are_what_the_engine_keeps_resident(model_path, name):
    """The plan's weights against a forward's real footprint: the mapped pages it reads (an untied
    embedding none: its rows are read from the file) and the weights' own copies."""
    from vramfit.gguf import GGUFFile
    from vramfit.model.loader import load_model
    from vramfit.runtime.engine import Engine

    gguf = GGUFFile(model_path(name))
    with open(gguf.path, "rb") as f:  # in the page cache, as after any earlier run
        while f.read(1 << 24):
            pass
    info = ModelInfo.from_gguf(gguf)
    model, _ = load_model(gguf.path, 256, gguf=gguf)
    ids = torch.randperm(info.n_vocab, generator=torch.Generator().manual_seed(0))[:64].tolist()
    Engine(model).eval(ids)
    mapped, copies = _resident_weights(model, gguf)
    planned = plan(info, None, len(ids), "f32", device=CPU).item("weights").device_bytes
    assert planned == pytest.approx(mapped + copies, rel=0.02)
    # no matrix is copied (q/k/v and gate/up are multiplied where they lie, NeoX RoPE rotates halves):
    # the copies are the float32 norms and biases
    vectors = sum(4 * math.prod(t.shape) for t in info.tensors if len(t.shape) == 1)
    assert copies <= vectors


def test_cpu_plan_holds_the_measured_peak(model_path):
    """bench/plan_accuracy.py's measurement (peak RSS of load, prefill and decode after a warm-up, in a
    fresh process) against the plan, on the smallest model: within 5%."""
    spec = importlib.util.spec_from_file_location("plan_accuracy", ROOT / "bench" / "plan_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_path("smollm2-135m")
    r = bench.measure("smollm2-135m", 1024, 256, "q8_0", 2, {})
    assert r["measured"] > r["items"]["weights"] + r["items"]["kv cache"]
    assert r["predicted"] == pytest.approx(r["measured"], rel=0.05)


def test_untied_embedding_is_never_mapped():
    """An untied embedding is read by row from the file: the plan counts none of it, at any context."""
    n_vocab, row = 151936, 616  # qwen2.5-0.5b's q5_0 rows
    embed = TensorEntry("token_embd.weight", n_vocab * row, None, "q5_0", (n_vocab, 896))
    info = ModelInfo("e", 1, 896, 1024, 14, 2, 64, n_vocab, 32768, kv_layers=1, tensors=(embed,))
    for n in (512, 8192, 32768):
        items = plan(info, None, n, "f32", device=CPU).items
        assert sum(i.device_bytes for i in items if i.what == "weights") == 0


def test_cpu_budget_picks_the_largest_context_that_fits(model_path):
    from vramfit.gguf import GGUFFile

    info = ModelInfo.from_gguf(GGUFFile(model_path("qwen2.5-coder-0.5b")))
    budget = 780 * MiB
    p = plan(info, budget, "max", "auto", device=CPU)
    # no type reaches the 32K training context in 780 MiB (256 of them the safety margin): q8_0 at its
    # largest context
    assert p.fits and (p.k_type, p.v_type) == ("q8_0", "q8_0") and 4096 <= p.ctx < info.n_ctx_train
    assert p.device_total <= budget
    assert not plan(info, budget, p.ctx + 256, "q8_0", device=CPU).fits  # one step more does not
    assert plan(info, budget, 2048, "auto", device=CPU).k_type == "f32"  # a short context: the best
    roomy = plan(info, 64 * GiB, "max", "auto", device=CPU)
    assert (roomy.ctx, roomy.k_type) == (info.n_ctx_train, "f32")
    small = plan(info, 300 * MiB, "max", "auto", device=CPU)
    assert not small.fits and small.verdict.startswith("does not fit: the weights and buffers need")
    assert small.nearest[-1].startswith("at least")


def test_cpu_workspace_counts_slots_and_the_kv_read_back():
    info = _27b()
    one = plan(info, None, 8192, "f32", device=CPU)
    two = plan(info, None, 8192, "f32", device=CPU, parallel=2)
    assert two.item("workspace").device_bytes == 2 * one.item("workspace").device_bytes
    # attention's temporaries: a q8_0 cache read back as float32 K and V (n_kv_heads x ctx x head_dim),
    # and per position the AVX-512 kernel's transposed keys (n_kv_heads x head_dim floats), the AVX2
    # kernel's row of scores per thread, or on torch's SDPA its boolean mask and the float mask it makes
    # of it (5 bytes x batch)
    from vramfit.runtime.memory import attention_bytes

    f32, q8 = (attention_bytes(info, 256, 65536, CPU, kv, kv) for kv in ("f32", "q8_0"))
    assert q8 - f32 == 2 * 4 * 4 * 65536 * 256
    kind = cpu_kernels.attention_variant(256, 256)
    if kind == "flash":
        per_position = 4 * 4 * 256
    elif kind == "rows":
        per_position = 4 * dispatch.get_threads()
    else:
        per_position = 5 * 256
    assert f32 - attention_bytes(info, 256, 32768, CPU) == per_position * 32768
    # at a long context on a q8_0 cache attention is the peak of the workspace
    ws = plan(info, None, 65536, "q8_0", device=CPU).item("workspace").device_bytes
    assert ws >= q8


def test_plan_json_reports_every_kv_type(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_random_model(random_model_spec("llama", "tiny"), path)
    assert main(["plan", str(path), "--mem", "1GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["device"] == "cpu" and d["budget"] == GiB and d["fits"]
    types = ("f32", "f16", "bf16", "q8_0", "q6_0", "q5_0", "iq4_nl", "q4_0")
    assert set(d["max_ctx"]) >= {f"{t}/{t}" for t in types}
    per_token = {f"{o['k']}/{o['v']}": o["bytes_per_token"] for o in d["kv_options"]}
    assert per_token["f32/f32"] == 2 * 2 * (2 * 64) * 4 and per_token["q8_0/q8_0"] == 2 * 2 * 4 * 34
    # 1 GiB holds far more than the tiny model's 2,048 training tokens: every type reaches past it,
    # fewer bytes per token reaching further
    ctxs = [d["max_ctx"][f"{t}/{t}"] for t in ("f32", "f16", "q8_0", "q4_0")]
    assert ctxs == sorted(ctxs) and ctxs[0] > 2048
    assert d["ctx"] == 2048 and (d["k_type"], d["v_type"]) == ("f32", "f32")
