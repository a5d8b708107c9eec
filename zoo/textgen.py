"""Helpers of ``mambazoo generate``: the --device and --prompt arguments, and printing tokens as text as they come."""

from __future__ import annotations

import os


def device_from_arg(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def prompt_ids(prompt: str, tokenizer) -> list[int]:
    """--prompt -> token ids: through the tokenizer (bytes: the argument's exact bytes, even when they are not
    UTF-8), else comma-separated ids."""

    from mambazoo.mambabyte.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return list(os.fsencode(prompt))  # the exact bytes given, also when they are not UTF-8
    if tokenizer is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"--prompt: not valid UTF-8 text ({os.fsencode(prompt)[e.start:e.end + 3]!r} at byte "
                             f"{e.start}); this model's tokenizer takes text") from e
        return list(tokenizer.encode(prompt))
    parts = [t.strip() for t in prompt.split(",") if t.strip()]
    try:
        return [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--prompt: this model has no tokenizer and takes token ids; give them comma-separated "
                         f"(e.g. --prompt 1,2,3), got {prompt[:40]!r}") from None


class TextOut:
    """Prints a stream of token ids as text as it comes: the decoded text of all new ids so far, minus what was
    printed (bytes go through an incremental UTF-8 decoder, so a character split over tokens prints whole)."""

    def __init__(self, tokenizer, out):
        import codecs

        from mambazoo.mambabyte.tokenizer import ByteTokenizer

        self.tok, self.out, self.ids, self.shown = tokenizer, out, [], ""
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace") if isinstance(tokenizer, ByteTokenizer) else None

    def put(self, token: int) -> None:
        if self.bytes is not None:
            text = self.bytes.decode(bytes([token]))
        else:
            self.ids.append(token)
            full = _decode(self.tok, self.ids)
            if full.endswith("\ufffd"):  # an unfinished character: wait for the next token
                return
            text, self.shown = full[len(self.shown):], full
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.bytes is not None:
            self.out.write(self.bytes.decode(b"", final=True))
        elif self.ids:
            full = _decode(self.tok, self.ids)
            self.out.write(full[len(self.shown):])
        self.out.write("\n")
        self.out.flush()


def _decode(tok, ids):
    try:
        return tok.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tok.decode(ids)
