"""generate / stream_generate: greedy equals step-by-step argmax of the full forward, batch > 1,
eos, streaming, sampling filters, bad input."""

import pytest
import torch

from mambazoo import create_model
from mambazoo.generation import generate, sample, stream_generate



def _greedy_by_full_forward(m, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = m(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


@pytest.mark.parametrize("name", ["mamba-tiny", "jamba-tiny", "moe-mamba-tiny"])
def test_greedy_matches_full_forward(name):
    m = create_model(name, n_layer=4).eval() if name == "jamba-tiny" else create_model(name).eval()
    ids = torch.randint(0, 200, (3, 5))
    out = m.generate(ids, 6, temperature=0)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, _greedy_by_full_forward(m, ids, 6))


def test_streaming_and_eos():
    m = create_model("mamba-tiny").eval()
    ids = torch.randint(0, 200, (2, 4))
    seen = []
    out = generate(m, ids, 5, temperature=0, streamer=seen.append)
    assert len(seen) == 5 and torch.equal(torch.stack(seen, 1), out[:, 4:])
    streamed = list(stream_generate(m, ids, 5, temperature=0))
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:])
    # eos = the first greedy token of sequence 0: it stops there and pads with eos until all stop
    eos = int(out[0, 4])
    stopped = generate(m, ids, 5, temperature=0, eos=eos)
    assert stopped[0, 4] == eos and torch.all(stopped[0, 4:] == eos)
    if not (out[1, 4:] == eos).any():
        assert stopped.shape[1] == 9
    assert generate(m, ids, 0).shape == (2, 4)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {2, 3}
    # probabilities 0.032, 0.087, 0.237, 0.644: top_p 0.7 keeps {3, 2}, 0.5 keeps {3}
    assert set(sample(logits, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample(logits, top_p=0.5, generator=g).tolist()) == {3}
    assert set(sample(logits, temperature=0).tolist()) == {3}
    assert len(set(sample(logits, temperature=1.0, generator=g).tolist())) == 4


def test_generate_bad_input():
    m = create_model("mamba-tiny").eval()
    ok = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer dtype"):
        m.generate(torch.ones(1, 2), 3)
    with pytest.raises(ValueError, match=r"ids in \[0, 512\)"):
        m.generate(torch.tensor([[1, 600]]), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(ok, -1)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(ok, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ok, 2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(ok, 2, top_k=0)
    with pytest.raises(ValueError, match="eos"):
        m.generate(ok, 2, eos=512)
    with pytest.raises(ValueError, match="streamer"):
        m.generate(ok, 2, streamer="print")


def test_generate_in_train_mode_uses_eval_and_restores():
    m = create_model("moe-mamba-tiny").train()  # capacity dropping would apply in training
    ids = torch.randint(0, 200, (2, 6))
    out = m.generate(ids, 3, temperature=0)
    assert m.training
    assert torch.equal(out, _greedy_by_full_forward(m.eval(), ids, 3))
