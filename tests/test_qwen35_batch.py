"""Qwen3.5 batched forward: two sequences of different lengths, run together (rows concatenated in the
matmuls; conv, delta rule, KV cache and attention per sequence), give each sequence the logits it gets
alone, through prefill, decode steps and a mixed prefill + decode batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_qwen35 import CASES, tiny, write_gguf
from vramfit.model.loader import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("qwen35b") / "kv2-v6.gguf"
    write_gguf(tiny(**CASES["kv2-v6"]), path)  # 2 key heads, 6 value heads, attention every 2nd layer
    yield load_model(path, n_ctx=256)[0]
    torch.set_num_threads(n)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


def _alone(model, chunks: list[torch.Tensor]) -> torch.Tensor:
    """One sequence fed chunk by chunk through `forward`: the logits of every token."""
    cache, pos, out = model.new_cache(), 0, []
    with torch.no_grad():
        for c in chunks:
            out.append(model.logits(model.forward(c, cache, pos)))
            pos += c.shape[0]
    return torch.cat(out)


def test_batch_of_two_equals_each_alone(model):
    a, b = _ids(150, seed=1), _ids(38, seed=2)
    # steps: prefill both (150 and 37 tokens: several delta-rule chunks / one padded chunk), two decode
    # steps, then a mixed batch (a decodes one token while b prefills 20 more), then a decode step
    steps = [(a[:140], b[:30]), (a[140:141], b[30:31]), (a[141:142], b[31:32]), (a[142:143], b[32:37])]
    steps += [(a[143:150], b[37:38])]
    caches = [model.new_cache(), model.new_cache()]
    got: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        for step in steps:
            hidden = model.forward_batch(list(step), caches)
            for i, h in enumerate(hidden):
                assert h.shape[0] == step[i].shape[0]
                got[i].append(model.logits(h))
    assert [c.pos for c in caches] == [sum(s[i].shape[0] for s in steps) for i in range(2)]
    for i in range(2):
        want = _alone(model, [s[i] for s in steps])
        np.testing.assert_allclose(torch.cat(got[i]).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(got[0])[:30], torch.cat(got[1])[:30])  # distinct sequences


def test_batch_checks_its_states(model):
    cache = model.new_cache()
    with pytest.raises(ValueError, match="its own state"):
        model.forward_batch([_ids(3, 1), _ids(4, 2)], [cache, cache])
    other = model.new_cache()
    model.forward(_ids(5, 3), other, 0)
    with pytest.raises(ValueError, match="holds 5 tokens"):
        model.forward_batch([_ids(3, 1), _ids(2, 2)], [cache, other], [0, 2])
    assert other.pos == 5  # a refused batch leaves every state as it was
