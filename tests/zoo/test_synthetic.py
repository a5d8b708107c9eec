"""mambazoo.data.synthetic: selective copying, induction heads, MQAR; seeded, train and test lengths apart."""

import pytest
import torch

from mambazoo.data.synthetic import SyntheticDataModule, induction_heads, mqar, selective_copy


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_selective_copy_targets_are_the_data_tokens_in_order():
    x, y = selective_copy(8, 40, n_tokens=5, vocab_size=10, g=gen())
    assert x.shape == y.shape == (8, 45)
    assert (x[:, 40:] == 1).all() and (y[:, :40] == -100).all()
    for row in range(8):
        data = x[row, :40][x[row, :40] > 0]
        assert data.tolist() == y[row, 40:].tolist()
        assert ((data >= 2) & (data < 10)).all()


def test_induction_heads_answer_follows_the_special_token():
    x, y = induction_heads(16, 30, vocab_size=8, g=gen())
    special = 7
    assert (x[:, -1] == special).all() and (y[:, :-1] == -100).all()
    for row in range(16):
        p = (x[row, :-1] == special).nonzero()
        assert len(p) == 1
        assert y[row, -1] == x[row, p[0, 0] + 1]


def test_mqar_values_belong_to_their_keys():
    x, y = mqar(4, 64, n_pairs=6, vocab_size=64, n_queries=4, g=gen())
    for row in range(4):
        pairs = {int(x[row, 2 * i]): int(x[row, 2 * i + 1]) for i in range(6)}
        assert all(1 <= k < 32 and v >= 32 for k, v in pairs.items())
        q = (y[row] != -100).nonzero()[:, 0]
        assert len(q) == 4 and (q >= 12).all()
        for t in q.tolist():
            assert pairs[int(x[row, t])] == int(y[row, t])


def test_generators_are_seeded():
    a, b = induction_heads(4, 20, g=gen(3)), induction_heads(4, 20, g=gen(3))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], induction_heads(4, 20, g=gen(4))[0])


@pytest.mark.parametrize("fn,kw", [(selective_copy, dict(seq_len=4, n_tokens=8)), (induction_heads, dict(seq_len=2)),
                                   (mqar, dict(seq_len=10, n_pairs=8))])
def test_bad_sizes_raise(fn, kw):
    with pytest.raises(ValueError):
        fn(2, g=gen(), **kw)


def test_datamodule_lengths_names_and_resume():
    dm = SyntheticDataModule("induction_heads", seq_len=32, batch_size=4, test_lengths=[32, 128, 512],
                             eval_samples=16, eval_batch_tokens=2048)
    assert dm.val_names == ["val"] and dm.test_names == ["test_L32", "test_L128", "test_L512"]
    loaders = dm.test_dataloader()
    shapes = [next(iter(l))[0].shape for l in loaders]
    assert [s[1] for s in shapes] == [32, 128, 512]
    assert shapes[2][0] == 4  # batch shrunk to 2048 tokens
    assert sum(b[0].shape[0] for b in loaders[2]) == 16
    v1, v2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(v1[0], v2[0])  # a fixed validation set
    import numpy as np
    b = dm._make_batch(np.random.default_rng([0, 0, 5]), 5)
    assert torch.equal(b[0], dm._make_batch(np.random.default_rng([0, 0, 5]), 5)[0]) and b[0].shape == (4, 32)


def test_unknown_task():
    with pytest.raises(ValueError, match="induction_heads"):
        SyntheticDataModule("copy")
