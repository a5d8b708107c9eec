"""model.generate with transformers' keywords: left-padded attention_mask equal to each prompt alone, eos as
int or list, min_new_tokens, repetition_penalty (against transformers' own logits processor), do_sample,
HF streamers, text in / text out, and the memory check before a too large cache is allocated."""

import io
import contextlib
import math

import pytest
import torch

import mambazoo
from mambazoo.generation import generate, kv_cache_bytes


def _model(name, **overrides):
    """Untied head and weights of order one: greedy continuations then depend on the whole prompt (a tied tiny
    model at its init mostly repeats its last token)."""
    torch.manual_seed(0)
    m = mambazoo.create_model(name, tie_embeddings=False, **overrides).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 if n == "embedding.weight" else p.shape[-1] ** -0.5)
    return m


def _ids(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, m.config.vocab_size, (1, n), generator=g)


@pytest.mark.parametrize("name", ["mamba-tiny", "jamba-tiny"])
def test_left_padding_equals_each_prompt_alone(name):
    m = _model(name)
    a, b = _ids(m, 3, 1), _ids(m, 7, 2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 3)], 1), torch.ones(1, 7)]).long()
    out = m.generate(batch, 6, temperature=0, attention_mask=mask)
    alone_a = m.generate(a, 6, temperature=0)[:, 3:]
    alone_b = m.generate(b, 6, temperature=0)[:, 7:]
    assert torch.equal(out[:, 7:], torch.cat([alone_a, alone_b]))
    assert not torch.equal(alone_a, alone_b)
    # without the mask the padded row continues differently: the padding is read as tokens
    assert not torch.equal(m.generate(batch, 6, temperature=0)[0, 7:], alone_a[0])


def test_attention_mask_checks():
    m = _model("mamba-tiny")
    ids = _ids(m, 4, 0)
    with pytest.raises(ValueError, match="left padding"):
        m.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        m.generate(ids, 2, attention_mask=torch.ones(1, 3))


def test_eos_int_or_list_and_min_new_tokens():
    m = _model("mamba-tiny")
    ids = _ids(m, 5, 3)
    free = m.generate(ids, 8, temperature=0)[0, 5:].tolist()
    unused = next(t for t in range(m.config.vocab_size) if t not in free)
    stop = m.generate(ids, 8, temperature=0, eos_token_id=[unused, free[3]])
    assert stop[0, 5:].tolist() == free[:free.index(free[3]) + 1]
    assert m.generate(ids, 8, temperature=0, eos=free[0])[0, 5:].tolist() == [free[0]]
    held = m.generate(ids, 8, temperature=0, eos_token_id=free[0], min_new_tokens=4)[0, 5:].tolist()
    assert free[0] not in held[:4] and len(held) >= 4
    # a finished row is filled with pad_token_id while the other goes on
    two = torch.cat([ids, _ids(m, 5, 9)])
    out = m.generate(two, 8, temperature=0, eos_token_id=free[0], pad_token_id=unused)
    assert out[0, 5:].tolist() == [free[0]] + [unused] * (out.shape[1] - 6)


def test_repetition_penalty_matches_transformers_processor():
    transformers = pytest.importorskip("transformers")
    m = _model("mamba-tiny", vocab_size=24)  # a small vocabulary: repeats are common, the penalty matters
    ids = _ids(m, 6, 4)
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.7)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            scores = proc(seq, m(seq)[:, -1])
            seq = torch.cat([seq, scores.argmax(-1, keepdim=True)], 1)
    ours = m.generate(ids, 6, do_sample=False, repetition_penalty=1.7)
    assert torch.equal(ours, seq)
    assert not torch.equal(ours, m.generate(ids, 6, do_sample=False))


def test_do_sample():
    m = _model("mamba-tiny")
    ids = _ids(m, 4, 5)
    assert torch.equal(m.generate(ids, 5, temperature=0.7, do_sample=False), m.generate(ids, 5, temperature=0))
    a = m.generate(ids, 5, do_sample=True, generator=torch.Generator().manual_seed(3))
    b = m.generate(ids, 5, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _tokenized_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                                pad_token="<unk>")
    m = mambazoo.create_model("mamba-tiny", vocab_size=len(words)).eval()
    m.tokenizer = fast
    return m, fast, transformers


def test_text_in_text_out_and_text_streamer(tmp_path):
    m, fast, transformers = _tokenized_model(tmp_path)
    text = m.generate("w1 w2 w3", 5, do_sample=False)
    ids = torch.tensor([fast.encode("w1 w2 w3")])
    expected = m.generate(ids, 5, do_sample=False, eos_token_id=fast.eos_token_id)
    assert text == "w1 w2 w3" + fast.decode(expected[0, 3:].tolist(), skip_special_tokens=True)
    two = m.generate(["w1 w2 w3", "w4"], 5, do_sample=False)
    assert two[0] == text and two[1].startswith("w4")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        m.generate(ids, 5, do_sample=False, streamer=transformers.TextStreamer(fast, skip_prompt=True))
    streamed = printed.getvalue().strip()
    assert streamed == fast.decode(expected[0, 3:].tolist()).strip() and streamed


def test_too_large_cache_is_refused_before_allocating():
    m = mambazoo.create_model("jamba-tiny")
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert kv_cache_bytes(m, 1, 10**12) > 10**14
    with pytest.raises(ValueError, match=r"max_new_tokens.*GiB"):
        m.generate(ids, 10**12)


@pytest.mark.parametrize("bad", [math.nan, "hot", -1.0, math.inf])
def test_bad_temperature(bad):
    m = mambazoo.create_model("mamba-tiny")
    with pytest.raises(ValueError, match="temperature"):
        generate(m, torch.zeros(1, 2, dtype=torch.long), 2, temperature=bad)


def test_long_generation_crosses_output_blocks():
    m = _model("mamba-tiny")
    ids = _ids(m, 3, 6)
    long = m.generate(ids, 1030, temperature=0)
    assert long.shape == (1, 1033)
    assert torch.equal(long[:, :43], m.generate(ids, 40, temperature=0))
    streamed = torch.stack(list(__import__("mambazoo.generation").generation.stream_generate(m, ids, 1030, 0.0)), 1)
    assert torch.equal(long[:, 3:], streamed)
