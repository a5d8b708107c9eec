"""`mambazoo generate`: --model NAME_OR_PATH streams text through the model's tokenizer; --checkpoint reads
Lightning checkpoints with weights_only=True (a malicious pickle runs nothing); every bad input is one line."""

import os

import pytest
import torch

import mambazoo
from mambazoo.cli import main
from mambazoo.hub import save_pretrained

transformers = pytest.importorskip("transformers")


def _word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(30)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def text_model(tmp_path):
    torch.manual_seed(0)
    m = mambazoo.create_model("mamba-tiny", vocab_size=32, tie_embeddings=False).eval()
    save_pretrained(m, tmp_path / "lm", tokenizer=_word_tokenizer())
    return tmp_path / "lm"


def test_generate_model_folder_streams_text(text_model, capsys):
    assert main(["generate", "--model", str(text_model), "--prompt", "w1 w2", "--max_new_tokens", "6",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model = mambazoo.from_pretrained(text_model)
    expected = model.generate("w1 w2", 6, do_sample=False)
    assert printed.rstrip("\n") == expected and len(expected) > len("w1 w2")


def _byte_checkpoint(path):
    from mambazoo.tasks import CausalLMTask

    task = CausalLMTask(model="mambabyte-tiny", model_kwargs={"n_layer": 1, "d_model": 16, "d_state": 4},
                        tokenizer="bytes", bytes_per_token=1.0)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return task


def test_generate_checkpoint_with_non_utf8_prompt(tmp_path, capsys):
    _byte_checkpoint(tmp_path / "lm.ckpt")
    prompt = os.fsdecode(b"ab\xff")  # what Python makes of a non-UTF-8 command-line argument
    assert main(["generate", "--checkpoint", str(tmp_path / "lm.ckpt"), "--prompt", prompt,
                 "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab\ufffd")


class _Evil:
    def __reduce__(self):
        return (os.makedirs, (os.environ["MAMBAZOO_EVIL_DIR"],))


def test_malicious_checkpoint_runs_nothing(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MAMBAZOO_EVIL_DIR", str(marker))
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "x", "bytes_per_token": 1}, "x": _Evil()},
               tmp_path / "evil.ckpt")
    assert main(["generate", "--checkpoint", str(tmp_path / "evil.ckpt"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "evil.ckpt" in err and "refused" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b'{"json": true}', "truncated"])
def test_bad_checkpoint_files(tmp_path, capsys, content):
    p = tmp_path / "bad.ckpt"
    if content == "truncated":
        _byte_checkpoint(tmp_path / "good.ckpt")
        content = (tmp_path / "good.ckpt").read_bytes()[:300]
    p.write_bytes(content)
    assert main(["generate", "--checkpoint", str(p), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "expected a .safetensors file or a torch checkpoint" in err


def test_text_prompt_to_a_token_id_model(tmp_path, capsys):
    save_pretrained(mambazoo.create_model("mamba-tiny").eval(), tmp_path / "ids")
    assert main(["generate", "--model", str(tmp_path / "ids"), "--prompt", "hello", "--max_new_tokens", "2"]) == 2
    assert "takes token ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "ids"), "--prompt", "1,2,3", "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("1,2,3,")


def test_bad_sampling_arguments(text_model, capsys):
    base = ["generate", "--model", str(text_model), "--prompt", "w1"]
    assert main(base + ["--temperature", "nan"]) == 2
    assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: "invalid float value: 'hot'"
        main(base + ["--temperature", "hot"])
    assert e.value.code == 2 and "invalid float value" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(text_model, capsys):
    assert main(["generate", "--model", str(text_model), "--prompt", "w1", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_max_new_tokens_beyond_memory(tmp_path, capsys):
    save_pretrained(mambazoo.create_model("jamba-tiny").eval(), tmp_path / "jamba")
    assert main(["generate", "--model", str(tmp_path / "jamba"), "--prompt", "1,2",
                 "--max_new_tokens", str(10**12)]) == 2
    assert "GiB" in capsys.readouterr().err


def test_generate_model_hub_id_offline(text_model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--lm" / "snapshots" / ("d" * 40)
    snap.mkdir(parents=True)
    for f in text_model.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--tiny-org--lm" / "refs").mkdir()
    (cache / "models--tiny-org--lm" / "refs" / "v1").write_text("d" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # where huggingface_hub looks by default
    assert main(["generate", "--model", "tiny-org/lm", "--revision", "v1", "--prompt", "w3", "--max_new_tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("w3")
    assert main(["generate", "--model", "tiny-org/lm", "--prompt", "w3"]) == 2  # no 'main' ref cached
    assert "tiny-org/lm: not in the local Hub cache" in capsys.readouterr().err
