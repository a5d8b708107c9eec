"""Pack a WAV folder tree into one .tar.xz at a lower sample rate (16-bit mono), to carry a
data set to a machine that cannot build it (the GPU machine has no espeak-ng).

    python scripts/pack_wavs.py --src data/spoken_digits --out .acc/spoken_digits.tar.xz --rate 8000

The tree keeps its layout (split/label/name.wav); WavFolderDataModule resamples on load.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels()).mean(1)
        return x.astype(np.float32) / 32768.0, w.getframerate()


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rate", type=int, default=8000)
    a = ap.parse_args(argv)
    src, out = Path(a.src), Path(a.out)
    files = sorted(src.rglob("*.wav"))
    if not files:
        raise SystemExit(f"no .wav files under {src}; build them with scripts/make_spoken_digits.py")
    out.parent.mkdir(parents=True, exist_ok=True)
    resamplers = {}
    with tarfile.open(out, "w:xz", preset=6) as tar:
        for f in files:
            x, rate = read_wav(f)
            if rate != a.rate:
                r = resamplers.setdefault(rate, torchaudio.transforms.Resample(rate, a.rate))
                x = r(torch.from_numpy(x)).numpy()
            data = wav_bytes(x, a.rate)
            info = tarfile.TarInfo(str(f.relative_to(src)))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    print(f"packed {len(files)} files into {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
