"""Hugging Face `tokenizer.json` tokenizers."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from polytrain.errors import DataError


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the lookups training and generation need."""

    def __init__(self, tokenizer: HFTokenizer, path: str) -> None:
        self._tok = tokenizer
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `path` (a tokenizer.json, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path} (set `data.tokenizer` to a tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{path}: not a valid Hugging Face tokenizer.json ({err})") from None
        return cls(tok, str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Every token (added ones included) and its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
