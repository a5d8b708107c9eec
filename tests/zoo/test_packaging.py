"""The one `mambazoo` namespace: it installs beside transformers and HuggingFace's `kernels`, from a wheel,
with ranges (not pins) on the PyTorch trio, its configs as package data, and a cheap import."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _python(code: str, cwd: Path, python: str = sys.executable, env: dict | None = None):
    """Run ``python -c code`` in ``cwd`` (the cwd is sys.path[0], as for a user's shell)."""
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_transformers_and_hf_kernels_work_beside_mambazoo(tmp_path):
    """transformers 5 imports HuggingFace's `kernels`; ours is mambazoo.kernels: both load and work."""
    import kernels as hf_kernels
    from transformers import MambaConfig, MambaForCausalLM

    import mambazoo.kernels
    from mambazoo.convert import load_pretrained

    assert Path(hf_kernels.__file__).resolve().parent != (ROOT / "kernels").resolve()
    assert mambazoo.kernels.__name__ == "mambazoo.kernels" and hasattr(mambazoo.kernels, "selective_scan_triton")

    # HF's kernels: a layer marked for hub kernels, kernelized with no mapping, keeps its own forward
    @hf_kernels.use_kernel_forward_from_hub("MambazooPackagingProbe")
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    layer = hf_kernels.kernelize(torch.nn.Sequential(Double()), mode=hf_kernels.Mode.INFERENCE, device="cpu")
    assert torch.equal(layer(torch.ones(3)), torch.full((3,), 2.0))

    # transformers' Mamba and ours give the same logits from the same weights
    cfg = MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
                      use_cache=False)
    hf = MambaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_running_from_the_checkout_shadows_no_distribution(tmp_path):
    """Python started in the repository's root finds core/ and kernels/ first on sys.path: an installed
    `kernels` (HuggingFace's) must still be the one imported, and `core` is no package of its own."""
    r = _python("import kernels, sys; print(kernels.__file__); print(hasattr(kernels, 'get_kernel'))", ROOT)
    assert r.returncode == 0, r.stderr
    path, has_hub_api = r.stdout.split()
    assert Path(path).resolve().parent != (ROOT / "kernels").resolve() and has_hub_api == "True"

    r = _python("import core", ROOT)
    assert r.returncode != 0 and "mambazoo.core" in r.stderr, r.stderr
    # and inside the namespace both load as usual, from the same folder
    r = _python("import mambazoo.core, mambazoo.kernels; print(mambazoo.core.selective_scan.__module__)", ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "mambazoo.core.dispatch", r.stderr


def test_import_mambazoo_and_list_load_no_heavy_library():
    """`import mambazoo` and `mambazoo list` load neither torch, timm, Lightning nor the kernels."""
    heavy = ("torch", "timm", "lightning", "triton", "mambazoo.kernels")
    r = _python("import sys, mambazoo, mambazoo.cli\n"
                "mambazoo.cli.main(['list'])\n"
                f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])", ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "LOADED []"
    assert r.stderr == ""  # no warning of ours


def test_timm_sees_vim_after_import_mambazoo():
    """The Vim architectures reach timm's registry when timm is imported after mambazoo (and before)."""
    for order in ("import mambazoo, timm", "import timm, mambazoo"):
        r = _python(f"{order}\nm = timm.create_model('vim_tiny_patch16_224', depth=1, num_classes=3)\n"
                    "print(type(m).__module__, 'vim_tiny_patch16_224' in timm.list_models('vim*'))", ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["mambazoo.vim.model", "True"], (order, r.stdout)


def test_every_python_folder_is_a_listed_package():
    """pyproject lists the packages by hand (their names are not their folders'): none may be missing."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    folders = {}
    for name, folder in mapping.items():
        for d in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(ROOT / folder).parts
            folders[".".join((name, *rel))] = d
    assert set(folders) <= listed, f"folders with Python files missing from pyproject's packages: {set(folders) - listed}"


def test_dependencies_are_ranges_not_pins():
    deps = PYPROJECT["project"]["dependencies"] + sum(PYPROJECT["project"]["optional-dependencies"].values(), [])
    for d in deps:
        name = d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        if name in ("torch", "torchvision", "torchaudio", "triton"):
            assert "==" not in d.split(";")[0], f"{d}: a library must not pin the user's PyTorch"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path):
    """Build the wheel, install it (not editable) into a new venv, and use it from another folder: its only
    top-level package is mambazoo, its metadata pins no PyTorch version, `mambazoo list` names every
    config, and a 2-step `fit --config mambabyte-tiny` writes a checkpoint, warning-free."""
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("mambazoo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert top == {"mambazoo"}, top
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for line in requires:
        spec = line.split(":", 1)[1].split(";")[0].strip()
        if spec.split(">")[0].split("=")[0].split("<")[0].strip() in ("torch", "torchvision", "torchaudio", "triton"):
            assert "==" not in spec, line
    configs = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert {f"mambazoo/configs/{c}.yaml" for c in configs} <= set(names)

    # A fresh venv that sees this environment's dependencies (torch & co.) but not its editable mambazoo
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # every site-packages folder this interpreter sees (a venv may itself borrow another's through a .pth)
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "_deps_from_test_env.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _python("import mambazoo, mambazoo.core, mambazoo.kernels; print(mambazoo.__file__)", work, str(py))
    assert r.returncode == 0 and str(venv) in r.stdout, r.stderr

    cli = str(venv / "bin" / "mambazoo")
    r = subprocess.run([cli, "list"], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == configs

    r = subprocess.run([cli, "fit", "--config", "mambabyte-tiny", "--trainer.max_steps", "2",
                        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.enable_progress_bar", "false", "--data.init_args.max_bytes", "200000",
                        "--run_dir", str(work / "run")], cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "args parameter" not in r.stderr and "mambazoo" not in "".join(
        line for line in r.stderr.splitlines() if "Warning" in line), r.stderr[-3000:]


def test_a_missing_extra_is_named(monkeypatch):
    """Without torchaudio the audio front end says which extra installs it; the rest still imports."""
    from mambazoo.audio.frontend import AudioFrontend
    from mambazoo.optional import MissingExtraError
    from mambazoo.tasks.checkpointing import plot_curves  # (torchmetrics looks for matplotlib on import)

    monkeypatch.setitem(sys.modules, "torchaudio", None)  # makes `import torchaudio` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'mambazoo\[audio\]'"):
        AudioFrontend(sample_rate=16000, n_mels=16, frames=8)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"mambazoo\[plots\]"):
        plot_curves("metrics.csv", "curves.png")
