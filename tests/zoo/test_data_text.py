"""mambazoo.data.text: byte corpora (stdlib default, file / folder / glob), token files, resumable streams."""

import numpy as np
import pytest
import torch

from mambazoo.data.streams import StepStream
from mambazoo.data.text import (ByteDataModule, TokenFileDataModule, Windows, load_byte_corpus, main, open_tokens,
                           resolve_files, stdlib_files)


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (root / ".hidden").write_text("secret")
    return root


def test_default_corpus_is_the_stdlib():
    files = stdlib_files()
    names = {f.name for f in files}
    assert "os.py" in names and "functools.py" in names
    assert not any("site-packages" in f.parts for f in files)


def test_resolve_file_folder_glob(corpus):
    assert resolve_files(corpus / "d0" / "f0.py") == [corpus / "d0" / "f0.py"]
    folder = resolve_files(corpus)
    assert len(folder) == 40 and all(not f.name.startswith(".") for f in folder)
    assert len(resolve_files(str(corpus / "d1" / "*.py"))) == len(list((corpus / "d1").glob("*.py")))
    with pytest.raises(FileNotFoundError, match="leave it unset for the standard-library corpus"):
        resolve_files(corpus / "nothing-here")


def test_split_by_file_holds_out_whole_files(corpus):
    train, val = load_byte_corpus(corpus, val_fraction=0.2)
    tr, va = bytes(train), bytes(val)
    assert len(va) > 0 and len(tr) > len(va)
    for i in range(40):  # each file's distinctive line lands on exactly one side
        line = f"def f{i}(x):\n    return x * {i}\n".encode()
        assert (line in tr) != (line in va), i


def test_single_file_tail_is_validation(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(256)) * 4)
    train, val = load_byte_corpus(f, val_fraction=0.25)
    assert len(val) == 256 and bytes(val) == bytes(range(256))


def test_byte_datamodule_batches_and_resume(corpus):
    dm = ByteDataModule(path=str(corpus), seq_len=16, batch_size=3, val_fraction=0.2, val_max_windows=5)
    dm.setup()
    stream = iter(StepStream(dm._make_batch, seed=0, start=0))
    batches = [next(stream) for _ in range(4)]
    assert batches[0].shape == (3, 17) and batches[0].dtype == torch.long
    assert not torch.equal(batches[0], batches[1])
    resumed = iter(StepStream(dm._make_batch, seed=0, start=2))  # a run resumed at step 2
    assert torch.equal(next(resumed), batches[2]) and torch.equal(next(resumed), batches[3])
    other_rank = iter(StepStream(dm._make_batch, seed=0, start=0, rank=1))
    assert not torch.equal(next(other_rank), batches[0])
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 5
    full = Windows(dm.val_data, 16)
    assert torch.equal(full[1][0], full[0][-1])  # consecutive windows share one token
    w = dm.val_windows()
    assert len(w) == 5 and w.starts[0] == 0 and w.starts[-1] >= (len(full) // 2) * 16  # spread over the data
    assert len(w.covered()) == 5 * 16


def test_stream_with_workers_keeps_batch_order(corpus):
    dm = ByteDataModule(path=str(corpus), seq_len=8, batch_size=2, val_fraction=0.2)
    dm.setup()
    ref = iter(StepStream(dm._make_batch, seed=1, start=3))
    loader = torch.utils.data.DataLoader(StepStream(dm._make_batch, seed=1, start=3), batch_size=None, num_workers=2)
    it = iter(loader)
    for _ in range(4):
        assert torch.equal(next(it), next(ref))
    del it


def test_token_files_uint16_npy_and_raw_uint32(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 500
    np.save(tmp_path / "train.npy", ids)
    (np.arange(300, dtype=np.uint32) + 70000).tofile(tmp_path / "val.bin")
    assert open_tokens(tmp_path / "train.npy").dtype == np.uint16
    dm = TokenFileDataModule(train_path=str(tmp_path / "train.npy"), val_path=str(tmp_path / "val.bin"),
                             dtype="uint32", seq_len=10, batch_size=2)
    dm.setup()
    batch = dm._make_batch(np.random.default_rng(0), 0)
    assert batch.shape == (2, 11) and int(batch.max()) < 500
    first = next(iter(dm.val_dataloader()))
    assert int(first[0, 0]) == 70000 and first.dtype == torch.long
    with pytest.raises(ValueError, match="uint16 or uint32"):
        np.save(tmp_path / "bad.npy", np.zeros(5, np.float32))
        open_tokens(tmp_path / "bad.npy")


def test_missing_token_file_says_how_to_build_it(tmp_path):
    dm = TokenFileDataModule(train_path=str(tmp_path / "missing.npy"))
    with pytest.raises(FileNotFoundError, match=r"python -m mambazoo\.data\.text export"):
        dm.setup()


def test_export_and_dump_val(corpus, tmp_path, capsys):
    main(["export", "--path", str(corpus), "--out", str(tmp_path / "tok")])
    train = np.load(tmp_path / "tok" / "train.u16.npy")
    assert train.dtype == np.uint16 and train.max() < 256 and len(train) > 0
    main(["dump-val", "--path", str(corpus), "--out", str(tmp_path / "val.bin"), "--seq-len", "16",
          "--val-max-windows", "3"])
    assert (tmp_path / "val.bin").stat().st_size == 3 * 16


def test_windows_reject_short_data():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Windows(np.zeros(5, np.uint8), seq_len=8)
