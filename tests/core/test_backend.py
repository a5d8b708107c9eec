"""mambazoo.core.backend: the choices read from the environment once, validated, overridden in code, described."""

import dataclasses

import pytest
import torch

from mambazoo.core import backend as B
from mambazoo.core.backend import Backend, backend, current, describe_backend


def test_environment_parsing_and_validation():
    b = Backend.from_env({"MAMBAZOO_SCAN": " Ref ", "MAMBAZOO_FUSED_DECODE": "0", "MAMBAZOO_CONV_PAIR": "1",
                          "MAMBAZOO_CONV": ""})
    assert (b.scan, b.fused_decode, b.conv_pair, b.conv) == ("ref", False, True, "auto")
    assert Backend.from_env({}) == Backend()
    with pytest.raises(ValueError, match="MAMBAZOO_FOLD_DT: expected 1 or 0, got 'maybe'"):
        Backend.from_env({"MAMBAZOO_FOLD_DT": "maybe"})
    with pytest.raises(ValueError, match="MAMBAZOO_CONV: expected auto, triton, torch, got 'cuda'"):
        Backend.from_env({"MAMBAZOO_CONV": "cuda"})
    with pytest.raises(ValueError, match="backend scan: expected one of"):
        Backend(scan="fast")
    with pytest.raises(ValueError, match="backend fold_dt"):
        Backend(fold_dt="0")  # a bool field takes a bool
    with pytest.raises(dataclasses.FrozenInstanceError):
        current().scan = "ref"


def test_every_field_names_its_variable_and_help():
    for f in dataclasses.fields(Backend):
        assert f.metadata["env"].startswith("MAMBAZOO_") and f.metadata["help"], f.name
        assert f.default in f.metadata["choices"], f.name


def test_override_in_code_is_scoped_and_restored_on_error():
    before = current()
    with backend(scan="ref", fused_decode=False) as b:
        assert current() is b and (b.scan, b.fused_decode) == ("ref", False)
        assert B.scan_impl(torch.device("cuda")) == "ref"
        with backend(scan="chunked"):
            assert current().scan == "chunked" and not current().fused_decode
        assert current().scan == "ref"
    assert current() is before
    with pytest.raises(RuntimeError, match="boom"), backend(conv="torch"):
        raise RuntimeError("boom")
    assert current() is before
    with pytest.raises(ValueError, match="unknown choice 'scans'"), backend(scans="ref"):
        pass


def test_resolution_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with backend(scan="auto", conv="auto", fused_decode=True):
        assert (B.scan_impl(cpu), B.scan_impl(cuda)) == ("chunked", "triton")
        assert (B.conv_impl(cpu), B.conv_impl(cuda)) == ("torch", "triton")
        with torch.no_grad():
            assert not B.fused_decode(cpu)  # the CPU scan is the chunked reference
            with backend(scan="triton"):
                assert B.fused_decode(cpu)  # tests run under TRITON_INTERPRET=1
                with backend(fused_decode=False):
                    assert not B.fused_decode(cpu)
        with backend(scan="triton"):
            assert not B.fused_decode(cpu)  # autograd on: the kernels have no backward


def test_describe_backend_lists_every_choice_and_its_source(monkeypatch):
    with backend(scan="ref"):
        text = describe_backend()
    for f in dataclasses.fields(Backend):
        assert f.name in text and f.metadata["env"] in text
    assert "scan           ref      set in code" in text
    assert "on cpu: scan ref" in text
    monkeypatch.setenv("MAMBAZOO_SCAN", "chunked")
    with backend(scan="chunked"):
        assert "scan           chunked  MAMBAZOO_SCAN=chunked" in describe_backend()


def test_reload_from_env_picks_up_later_changes(monkeypatch):
    before = current()
    monkeypatch.setattr(B, "_current", before)  # restored after the test
    monkeypatch.setenv("MAMBAZOO_SCAN", "ref")
    assert current().scan == before.scan  # read once, at import
    assert B.reload_from_env().scan == "ref" and current().scan == "ref"
