"""zoo/graphs.py: CUDA-graph inference. The capture itself needs a GPU (scripts/bench_vision.py --cuda-graph checks the
replayed outputs against eager ones there); here: the eager fallback, the keying and eviction of captured graphs,
and bad input."""

import pytest
import torch

from mambazoo.graphs import GraphedInference


class _Recorded(GraphedInference):
    """Captures on the CPU with a stand-in for the graph: replay() recomputes into the static output, so keying,
    eviction, the static input copy and cloning are exercised without a GPU."""

    def _capturable(self, x):
        return True

    def _capture(self, x):
        static_x = x.clone()
        out = self.fn(static_x)
        fn = self.fn

        class Replay:
            def replay(self):
                out.copy_(fn(static_x))

        self.captures = getattr(self, "captures", 0) + 1
        return static_x, Replay(), out


def test_runs_eagerly_off_cuda_and_matches():
    m = torch.nn.Linear(6, 3)
    g = GraphedInference(m)
    x = torch.randn(4, 6)
    with torch.inference_mode():
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    assert not g.graphs  # nothing captured on the CPU


def test_one_graph_per_key_replayed_with_new_inputs_and_evicted_oldest_first():
    m = torch.nn.Linear(6, 3)
    g = _Recorded(m, max_graphs=2)
    with torch.no_grad():
        a, b = torch.randn(4, 6), torch.randn(4, 6)
        ya = g(a)
        yb = g(b)  # same key: a replay on b's values, not a's
        torch.testing.assert_close(yb, m(b))
        torch.testing.assert_close(ya, m(a))  # cloned: the replay did not overwrite the first result
        assert g.captures == 1
        g(torch.randn(5, 6))  # a second shape: a second graph
        g(torch.randn(4, 6))  # (4, 6) used again: now the most recent
        assert g.captures == 2 and len(g.graphs) == 2
        g(torch.randn(7, 6))  # a third shape evicts the least recently used, (5, 6)
        assert g.captures == 3 and [k[0] for k in g.graphs] == [(4, 6), (7, 6)]
        g(torch.randn(5, 6))  # captured again, evicting (4, 6)
        assert g.captures == 4 and [k[0] for k in g.graphs] == [(7, 6), (5, 6)]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast state is part of the key
            g(torch.randn(5, 6))
        assert g.captures == 5
        g.reset()
        assert not g.graphs


def test_without_clone_the_output_buffer_is_reused():
    m = torch.nn.Linear(6, 3)
    g = _Recorded(m, clone=False)
    with torch.no_grad():
        y1 = g(torch.randn(2, 6))
        y2 = g(torch.ones(2, 6))
    assert y1.data_ptr() == y2.data_ptr()
    torch.testing.assert_close(y1, m(torch.ones(2, 6)))


def test_rejects_bad_use():
    m = torch.nn.Linear(6, 3)
    with pytest.raises(RuntimeError, match="inference"):
        GraphedInference(m)(torch.randn(2, 6))  # autograd on
    with torch.no_grad():
        with pytest.raises(ValueError, match="x: expected a tensor"):
            GraphedInference(m)([1.0] * 6)
    with pytest.raises(ValueError, match="callable"):
        GraphedInference(3)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedInference(m, max_graphs=0)
