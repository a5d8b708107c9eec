"""Byte-level tokenization (one token per byte, ids 0..255) and the bits-per-byte metric."""

from __future__ import annotations

import math

import torch


class ByteTokenizer:
    """The one byte tokenizer of the zoo (it replaces the tasks' former ByteCodec): text or bytes <-> byte ids
    0..255. encode never fails (str is UTF-8 encoded, lone surrogates kept; bytes pass through); decode returns
    str with invalid UTF-8 replaced (errors="replace") or the exact bytes with ``decode_bytes``, so
    ``decode_bytes(encode(b)) == b`` for any bytes b; an id outside 0..255 raises ValueError. Has the attributes
    generation reads from transformers' tokenizers (no eos / pad token: bytes have none)."""

    vocab_size = 256
    eos_token_id = None
    pad_token_id = None

    def encode(self, data: str | bytes | bytearray) -> list[int]:
        if isinstance(data, str):
            data = data.encode("utf-8", errors="surrogatepass")
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"data: expected str or bytes, got {type(data).__name__}")
        return list(data)

    def encode_tensor(self, data: str | bytes, device=None) -> torch.Tensor:
        """(1, n) int64 tensor of byte ids."""
        return torch.tensor([self.encode(data)], dtype=torch.long, device=device)

    @staticmethod
    def _ids(ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids: expected one sequence (n,), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < 256]
        if bad:
            raise ValueError(f"ids: expected byte ids in [0, 256), got {bad[:5]}")
        return ids

    def decode_bytes(self, ids) -> bytes:
        return bytes(self._ids(ids))

    def decode(self, ids, errors: str = "replace", skip_special_tokens: bool = False) -> str:
        """ids (n,) -> str; skip_special_tokens is accepted for transformers' signature (bytes have none)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


# The name the Lightning tasks used for the same thing.
ByteCodec = ByteTokenizer


def bits_per_byte(loss_nats: float | torch.Tensor) -> float | torch.Tensor:
    """Mean cross-entropy per byte in nats -> bits per byte (divide by ln 2)."""
    return loss_nats / math.log(2)
