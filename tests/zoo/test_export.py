"""torch.export and torch.compile(fullgraph=True) of the LMs and Vim at inference (no_grad): no graph break
(the input-id range check becomes an in-graph assert when traced), equal outputs."""

import pytest
import torch
import torch._dynamo

import mambazoo


def _input(name, model):
    if name.startswith("vim"):
        return torch.randn(2, 1, 28, 28)
    return torch.randint(0, model.config.vocab_size, (2, 8))


@pytest.mark.parametrize("name", ["mamba-tiny", "jamba-tiny", "vim-tiny-fashion"])
def test_no_graph_break_and_export(name):
    model = mambazoo.create_model(name).eval()
    x = _input(name, model)
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x))


def test_compiled_fullgraph_equals_eager():
    model = mambazoo.create_model("mamba-tiny").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
        with pytest.raises(Exception, match="expected ids in"):  # the range check still holds in the graph
            compiled(torch.full((1, 6), model.config.vocab_size))
