"""Qwen3.5 hybrid (Gated DeltaNet + gated attention): tiny random `transformers` qwen3_5 text models,
written to GGUF the way llama.cpp's converter writes them (conversion/qwen.py: tiled value heads,
+1 folded into the zero-centred norms, ssm_a = -exp(A_log), squeezed conv weights), must give
transformers' float32 logits; prefill + decode, chunked and step-by-step forms must agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vramfit import quant
from vramfit.gguf import GGUFWriter, type_by_name
from vramfit.model.loader import load_model
from vramfit.model.qwen35 import (
    DeltaNetConfig,
    HybridState,
    Qwen35Config,
    delta_rule_chunked,
    delta_rule_step,
)
from vramfit.runtime.engine import Engine

transformers = pytest.importorskip("transformers")

HF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_b": "ssm_beta", "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.dt_proj": "ssm_dt", "linear_attn.A_log": "ssm_a", "linear_attn.conv1d": "ssm_conv1d",
    "linear_attn.norm": "ssm_norm", "linear_attn.out_proj": "ssm_out",
}  # fmt: skip


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf in top or hf == "lm_head.weight":
        return top.get(hf, "output.weight")
    parts = hf.split(".")  # model.layers.{i}.<module...>[.weight|.bias]
    if parts[-1] not in ("weight", "bias"):
        return f"blk.{parts[2]}.{HF_NAMES['.'.join(parts[3:])]}"  # A_log: no suffix
    return f"blk.{parts[2]}.{HF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _tile_heads(t: torch.Tensor, dim: int, n_k: int, ratio: int, head_dim: int) -> torch.Tensor:
    """HF groups value heads by key head [G0v0 G0v1 .. G1v0 ..]; llama.cpp tiles them [G0v0 G1v0 ..]."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], n_k, ratio, head_dim, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).reshape(shape)


def _convert(name: str, t: torch.Tensor, cfg) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (GGUF name, tensor) as conversion/qwen.py's Qwen3_5TextModel does it."""
    n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    d_k, d_v, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, n_v // n_k
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.replace(".dt_bias", ".dt_proj.bias")
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "linear_attn." in name and r > 1:
        qk = 2 * n_k * d_k
        if ".in_proj_qkv." in name or ".conv1d." in name:
            t = torch.cat([t[:qk], _tile_heads(t[qk:], 0, n_k, r, d_v)])
        elif ".in_proj_z." in name:
            t = _tile_heads(t, 0, n_k, r, d_v)
        elif any(s in name for s in (".in_proj_a.", ".in_proj_b.", ".A_log", ".dt_proj.")):
            t = _tile_heads(t, 0, n_k, r, 1)
        elif ".out_proj." in name:
            t = _tile_heads(t, 1, n_k, r, d_v)
    return _gguf_name(name), t


def _quantizable(name: str, t: torch.Tensor, cfg) -> bool:
    """Matrices whose rows are whole q8_0 blocks, except a column-reordered ssm_out (its blocks would
    change) and the conv (llama.cpp keeps it F32; it is 3-D in HF)."""
    tiled_cols = ".out_proj." in name and cfg.linear_num_value_heads != cfg.linear_num_key_heads
    return t.ndim == 2 and t.shape[1] % 32 == 0 and not tiled_cols


def round_trip_q8_0(model) -> None:
    """Replace the quantizable HF weights by their q8_0 values, so that only the products differ."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _quantizable(name, p, model.config):
                p.copy_(torch.from_numpy(quant.decode("q8_0", quant.encode("q8_0", p), p.shape[1])))


def write_gguf(model, path, qtype: str | None = None) -> None:
    cfg, arch = model.config, "qwen35"
    w = GGUFWriter(path)
    w.add("general.architecture", arch)
    rope = cfg.rope_parameters
    for key, value in {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size,
        "rope.freq_base": float(rope["rope_theta"]),
        "rope.dimension_count": int(cfg.head_dim * rope["partial_rotary_factor"]),
        "rope.dimension_sections": [11, 11, 10, 0],
        "ssm.conv_kernel": cfg.linear_conv_kernel_dim, "ssm.state_size": cfg.linear_key_head_dim,
        "ssm.group_count": cfg.linear_num_key_heads, "ssm.time_step_rank": cfg.linear_num_value_heads,
        "ssm.inner_size": cfg.linear_value_head_dim * cfg.linear_num_value_heads,
        "full_attention_interval": cfg.layer_types.index("full_attention") + 1,
    }.items():  # fmt: skip
        w.add(f"{arch}.{key}", value)
    f32 = type_by_name("f32")
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname, t = _convert(name, t.float(), cfg)
        if qtype and _quantizable(name, t, cfg):
            w.add_tensor(gname, tuple(t.shape), type_by_name(qtype), quant.encode(qtype, t))
        else:
            w.add_tensor(gname, tuple(t.shape), f32, t.contiguous().numpy())
    w.write()


def tiny(**extra):
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, full_attention_interval=2, tie_word_embeddings=False,
    )  # fmt: skip
    common.update(extra)
    cfg = transformers.AutoConfig.for_model("qwen3_5_text", **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms so that a wrong norm placement or +1 shows
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("A_log"):  # slow decays, so that the state carries across chunks
                p.copy_(torch.empty_like(p).uniform_(0.02, 0.3).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


CASES = {
    # 2 key heads, 6 value heads: the 1:3 head broadcast of the 27B (tiled in GGUF, grouped in HF)
    "kv2-v6": dict(linear_num_value_heads=6, linear_value_head_dim=12),
    "interval4-tied": dict(full_attention_interval=4, tie_word_embeddings=True, linear_num_key_heads=4,
                           linear_num_value_heads=4),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: a second intra-op thread only adds waits (10x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    model = tiny(**CASES[request.param])
    path = tmp_path_factory.mktemp("qwen35") / f"{request.param}.gguf"
    write_gguf(model, path)
    ours, _ = load_model(path, n_ctx=512)
    return model, ours


@pytest.fixture(scope="module")
def reference(pair):
    """350 token ids and transformers' float32 logits for them (one forward, shared by tests)."""
    model, _ = pair
    ids = _ids(350, seed=2)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].numpy()


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tensor_names_are_llama_cpps(pair):
    """The helper's names are those of llama.cpp's own table (gguf-py, MODEL_ARCH.QWEN35)."""
    import gguf

    model, _ = pair
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, model.config.num_hidden_layers)
    for name, t in model.state_dict().items():
        hf = name.replace(".dt_bias", ".dt_proj.bias")
        assert _convert(name, t, model.config)[0] == table.get_name(hf, try_suffixes=(".weight", ".bias"))


def test_config_from_metadata(pair):
    model, ours = pair
    hf, c = model.config, ours.cfg
    assert (c.deltanet.n_k_heads, c.deltanet.n_v_heads) == (
        hf.linear_num_key_heads,
        hf.linear_num_value_heads,
    )
    assert (c.deltanet.d_k, c.deltanet.d_v) == (hf.linear_key_head_dim, hf.linear_value_head_dim)
    assert c.rope.dim == hf.head_dim // 4
    kinds = ["linear_attention" if c.is_recurrent(i) else "full_attention" for i in range(c.n_layer)]
    assert kinds == hf.layer_types


def test_logits_match_transformers(pair, reference):
    _, ours = pair
    ids, want = reference
    got = Engine(ours, prefill_chunk=97).logits_all(ids).numpy()  # chunks of 97: 64 + 33 inside
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_equals_full_forward(pair, reference):
    """A 300-token prompt, then 50 decode steps, against one full forward of the 350 tokens."""
    _, ours = pair
    ids, want = reference
    cache = ours.new_cache()
    with torch.no_grad():
        got = [ours.logits(ours.forward(torch.tensor(ids[:300]), cache, 0))]
        for pos in range(300, 350):
            got.append(ours.logits(ours.forward(torch.tensor(ids[pos : pos + 1]), cache, pos)))
    np.testing.assert_allclose(torch.cat(got).numpy(), want, atol=1e-4, rtol=1e-4)


def test_q8_0_weights_match_transformers(tmp_path):
    """Community files are quantized: q8_0 matrices (attn_q split into q and gate rows, fused products
    of mixed types) against transformers holding the same q8_0-rounded weights. The tolerance leaves
    room for the CPU kernels' 8-bit activations (measured 0.8% of the logit scale; a gate made of
    the wrong rows is off by 7%)."""
    model = tiny(**CASES["kv2-v6"])
    round_trip_q8_0(model)
    write_gguf(model, tmp_path / "q8.gguf", qtype="q8_0")
    ours, gguf = load_model(tmp_path / "q8.gguf", n_ctx=128)
    assert gguf.tensors["blk.1.attn_q.weight"].type == type_by_name("q8_0")
    ids = _ids(100)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = Engine(ours).logits_all(ids).numpy()
    np.testing.assert_allclose(got, want, atol=2.5e-2 * np.abs(want).max())


def test_chunked_prefill_equals_step_by_step(pair):
    _, ours = pair
    ids = _ids(100, seed=3)
    with torch.no_grad():
        full = ours.logits(ours.forward(torch.tensor(ids), ours.new_cache(), 0))
        cache = ours.new_cache()
        steps = [ours.logits(ours.forward(torch.tensor([t]), cache, p)) for p, t in enumerate(ids)]
    np.testing.assert_allclose(full.numpy(), torch.cat(steps).numpy(), atol=1e-4, rtol=1e-4)


def test_engine_prefix_reuse_with_a_recurrent_state(pair):
    """A prompt that extends the cached tokens continues the state; one that shares only part of
    them must not reuse the recurrent state (it cannot be rolled back)."""
    _, ours = pair
    a, b = _ids(80, seed=4), _ids(80, seed=4)[:50] + _ids(30, seed=5)
    longer = b + _ids(20, seed=6)
    eng = Engine(ours)
    eng.eval(a)
    got_b = eng.eval(b)
    assert len(eng.tokens) == len(b)
    got_longer = eng.eval(longer)
    for ids, got in ((b, got_b), (longer, got_longer)):
        want = Engine(ours).eval(ids)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


def test_forward_refuses_a_gap_in_the_recurrent_state(pair):
    _, ours = pair
    cache = ours.new_cache()
    ours.forward(torch.tensor(_ids(10)), cache, 0)
    with pytest.raises(ValueError, match="holds 10 tokens"):
        ours.forward(torch.tensor(_ids(3)), cache, 5)


@pytest.mark.parametrize("t", [1, 63, 64, 200])
def test_chunked_delta_rule_equals_recurrent(t):
    """Random heads (3 value heads), a non-zero initial state, lengths around the chunk size."""
    gen = torch.Generator().manual_seed(t)
    h, d_k, d_v = 3, 8, 5

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = _unit(rnd(h, t, d_k)), _unit(rnd(h, t, d_k))
    v = rnd(h, t, d_v)
    g = -torch.rand(h, t, generator=gen) * 0.5
    beta = torch.rand(h, t, generator=gen)
    s0 = rnd(h, d_k, d_v)
    s_chunk, s_step = s0.clone(), s0.clone().double()
    got = delta_rule_chunked(q, k, v, g, beta, s_chunk, chunk=64)
    want = torch.stack(
        [delta_rule_step(*(x[:, i].double() for x in (q, k, v, g, beta)), s_step) for i in range(t)], dim=1
    )
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(s_chunk.numpy(), s_step.numpy(), atol=2e-5, rtol=1e-5)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_delta_rule_step_by_hand():
    """One head, d_k = d_v = 1: S <- e^g S; u = beta (v - S k); S <- S + k u; o = S q."""
    s = torch.tensor([[[2.0]]])
    q, k, v = torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[3.0]])
    g, beta = torch.tensor([np.log(0.5)], dtype=torch.float32), torch.tensor([0.25])
    o = delta_rule_step(q, k, v, g, beta, s)
    # decayed S = 1; u = 0.25 * (3 - 1) = 0.5; S = 1.5; o = 0.75
    assert s.item() == pytest.approx(1.5)
    assert o.item() == pytest.approx(0.75)


def test_state_bytes_of_the_27b_config():
    """The document's figures: 64 KiB of f16 KV per token over the 16 attention layers, and
    144 MiB of delta-rule state + 5.625 MiB of conv state per sequence (48 DeltaNet layers)."""
    from vramfit.model.layers import RopeConfig

    cfg = Qwen35Config(
        arch="qwen35", n_layer=64, n_embd=5120, n_ff=17408, n_head=24, n_head_kv=4, head_dim=256,
        n_vocab=248320, n_ctx_train=262144, norm_eps=1e-6, rope=RopeConfig(dim=64, base=1e7, style="neox"),
        deltanet=DeltaNetConfig(n_k_heads=16, n_v_heads=48, d_k=128, d_v=128, conv_kernel=4),
        attn_interval=4,
    )  # fmt: skip
    assert sum(not cfg.is_recurrent(i) for i in range(64)) == 16
    assert HybridState.bytes_per_token(cfg, torch.float16) == 64 * 1024
    assert HybridState.bytes_per_sequence(cfg) == 144 * 2**20 + 5.625 * 2**20
