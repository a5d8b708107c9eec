"""Loading state dicts in mamba-ssm's ``Mamba3`` key names and shapes (modules/mamba3.py, commit 0348a3d)."""

import pytest
import torch

from mambazoo.core.mamba3 import Mamba3, mamba3_config_from_state_dict, mamba3_from_state_dict


def published_state_dict(d_model, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5,
                         is_mimo=False, mimo_rank=4, is_outproj_norm=False, prefix=""):
    """Random tensors under the names and shapes the published Mamba3.__init__ registers."""
    d_inner = expand * d_model
    H = d_inner // headdim
    R = mimo_rank if is_mimo else 1
    split = int(d_state * rope_fraction)
    split -= split % 2
    S = split // 2
    d_in_proj = 2 * d_inner + 2 * d_state * ngroups * R + 3 * H + S  # z, x, B, C, dd_dt, dd_A, trap, angle
    sd = {"in_proj.weight": (d_in_proj, d_model), "dt_bias": (H,), "B_bias": (H, R, d_state),
          "C_bias": (H, R, d_state), "B_norm.weight": (d_state,), "C_norm.weight": (d_state,), "D": (H,),
          "out_proj.weight": (d_model, d_inner)}
    if is_mimo:
        sd.update({"mimo_x": (H, R, headdim), "mimo_z": (H, R, headdim), "mimo_o": (H, R, headdim)})
    if is_outproj_norm:
        sd["norm.weight"] = (d_inner,)
    return {prefix + k: torch.randn(shape) for k, shape in sd.items()}


CASES = [dict(d_model=64), dict(d_model=32, d_state=16, headdim=16, rope_fraction=1.0),
         dict(d_model=32, d_state=16, headdim=8, is_mimo=True, mimo_rank=2, is_outproj_norm=True),
         dict(d_model=32, d_state=16, headdim=8, ngroups=2, is_mimo=True, mimo_rank=4)]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_published_state_dict_loads_strictly(cfg):
    sd = published_state_dict(**cfg)
    m = Mamba3(**cfg)
    assert set(m.state_dict()) == set(sd)  # the same names, nothing more or less
    m.load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the configuration is recovered from the shapes alone
    inferred = mamba3_config_from_state_dict(sd)
    for k, v in cfg.items():
        assert inferred[k] == v, k
    m2 = mamba3_from_state_dict({"backbone.layers.3.mixer." + k: v for k, v in sd.items()},
                                prefix="backbone.layers.3.mixer.", chunk_size=8)
    x = torch.randn(1, 5, cfg["d_model"])
    with torch.no_grad():
        assert torch.allclose(m2(x), m(x), rtol=1e-5, atol=1e-5)


def test_strict_loading_rejects_missing_and_misshaped_keys():
    cfg = dict(d_model=32, d_state=16, headdim=8, is_mimo=True, mimo_rank=2)
    sd = published_state_dict(**cfg)
    m = Mamba3(**cfg)
    bad = dict(sd)
    del bad["mimo_o"]
    with pytest.raises(RuntimeError, match="mimo_o"):
        m.load_state_dict(bad, strict=True)
    bad = dict(sd, B_bias=torch.randn(8, 1, 16))
    with pytest.raises(RuntimeError, match="B_bias"):
        m.load_state_dict(bad, strict=True)
    with pytest.raises(ValueError, match=r"expected the keys \['out_proj.weight'\]"):
        mamba3_config_from_state_dict({k: v for k, v in sd.items() if k != "out_proj.weight"})
    with pytest.raises(ValueError, match="in_proj.weight: expected 2 d_inner"):
        mamba3_config_from_state_dict(dict(sd, **{"in_proj.weight": torch.randn(7, 32)}))
