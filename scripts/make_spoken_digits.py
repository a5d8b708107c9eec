"""Build the spoken-digits data set locally with espeak-ng: the ten digits, spoken by English accents x
voice variants x speeds x pitches, as WAV files in root/{train,val,test}/{0..9}/*.wav.

The split is BY VOICE VARIANT (espeak-ng's speaker identities, e.g. 'f3', 'Annie', 'klatt'): a
test voice is never heard in training, under any accent, speed or pitch. The output is
deterministic: the same arguments give the same files and the same split.

    sudo apt-get install espeak-ng
    python scripts/make_spoken_digits.py --root data/spoken_digits            # the full set
    python scripts/make_spoken_digits.py --root /tmp/sd --max-variants 6 --speeds 175 --pitches 50
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's own English voices (not the mbrola ones, which need extra packages); the default four
# keep the full set near 16k files (~0.5 GB): 101 variants x 4 accents x 2 speeds x 2 pitches x 10.
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-us-nyc")
DEFAULT_ACCENTS = ACCENTS[:4]


def espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng not found: install it with `sudo apt-get install espeak-ng`")
    return exe


def list_variants(exe: str) -> list[str]:
    """The voice variants espeak-ng knows (the '!v/<name>' files), sorted."""
    out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[4][3:] for line in out.splitlines()[1:]
             if len(line.split()) >= 5 and line.split()[4].startswith("!v/")}
    return sorted(names)


def available_accents(exe: str, wanted=ACCENTS) -> list[str]:
    """Those of ``wanted`` that espeak-ng has."""
    out = subprocess.run([exe, "--voices=en"], capture_output=True, text=True, check=True).stdout
    known = {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
    return [a for a in wanted if a in known]


def split_voices(variants: list[str], val_frac: float, test_frac: float) -> dict[str, str]:
    """variant -> 'train' | 'val' | 'test', by a stable hash of the name (independent of which other
    variants exist), with at least one variant in each split when there are three or more."""
    ranked = sorted(variants, key=lambda v: hashlib.sha256(v.encode()).hexdigest())
    n = len(ranked)
    n_test = max(1, round(test_frac * n)) if n >= 3 else 0
    n_val = max(1, round(val_frac * n)) if n >= 3 else 0
    return {v: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, v in enumerate(ranked)}


def speak(exe: str, text: str, voice: str, speed: int, pitch: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                   check=True, capture_output=True)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data/spoken_digits", help="output folder")
    ap.add_argument("--accents", nargs="*", default=None, help=f"default: those of {DEFAULT_ACCENTS} espeak-ng has; known: {ACCENTS}")
    ap.add_argument("--max-variants", type=int, default=None, help="use the first N variants (sorted)")
    ap.add_argument("--speeds", type=int, nargs="+", default=[140, 200], help="words per minute")
    ap.add_argument("--pitches", type=int, nargs="+", default=[35, 65], help="0..99")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    exe = espeak()
    accents = args.accents or available_accents(exe, DEFAULT_ACCENTS)
    variants = list_variants(exe)[: args.max_variants]
    if not accents or not variants:
        sys.exit(f"espeak-ng offers no usable accents ({accents}) or variants ({len(variants)})")
    split_of = split_voices(variants, args.val_frac, args.test_frac)
    root = Path(args.root)
    jobs = []
    for variant in variants:
        for accent in accents:
            for speed in args.speeds:
                for pitch in args.pitches:
                    for digit, word in enumerate(DIGITS):
                        name = f"{accent}+{variant}_s{speed}_p{pitch}.wav"
                        path = root / split_of[variant] / str(digit) / name
                        jobs.append((word, f"{accent}+{variant}", speed, pitch, path))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda j: speak(exe, *j), jobs))

    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        counts[split] = {str(d): len(list((root / split / str(d)).glob("*.wav"))) for d in range(10)}
        voices = sorted(v for v, s in split_of.items() if s == split)
        print(f"{split:5s}: {sum(counts[split].values()):6d} files, {len(voices)} voice variants x "
              f"{len(accents)} accents x {len(args.speeds)} speeds x {len(args.pitches)} pitches; "
              f"per digit {counts[split]['0']}")
    print(f"wrote {len(jobs)} files under {root}")
    return counts


if __name__ == "__main__":
    main()
