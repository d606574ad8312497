"""Tokenizers and token windows for calibration and evaluation text.

``load_tokenizer`` reads a ``tokenizer.json`` (HuggingFace ``tokenizers``) or a GGUF file that embeds a
tokenizer (converted by transformers). ``text_windows`` cuts a text file into non-overlapping
``seq_len`` windows of token ids. It reads and tokenizes the file incrementally, in line-aligned chunks
encoded in parallel, and stops as soon as it has the windows asked for, so a few windows of a 10 MB
file cost milliseconds. ``start_fraction`` / ``end_fraction`` select a byte range of the file, so that
calibration and evaluation can use disjoint parts of one text.

No special tokens (BOS/CLS/SEP) are added: windows are plain running text, as in perplexity
evaluation of causal LMs.
"""

from __future__ import annotations

import codecs
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qcompiler.errors import QCompileError

__all__ = ["TokenizerLike", "Tokenizer", "TextDataError", "load_tokenizer", "text_windows"]

logger = logging.getLogger(__name__)

_READ_BYTES = 1 << 20  # bytes read per step
_CHUNK_CHARS = 1 << 16  # characters per chunk handed to the tokenizer
_PARALLEL_CHUNKS = 16  # chunks encoded per batch call


class TextDataError(QCompileError):
    """A tokenizer or text file cannot be used (missing, empty, unreadable, too short)."""


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the small interface the compiler needs.

    Attributes:
        backend: the wrapped ``tokenizers.Tokenizer``.
        source: where it was loaded from (for messages).
    """

    backend: Any
    source: str = ""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a ``tokenizer.json``, a folder holding one, or a ``.gguf`` file.

    Raises:
        TextDataError: the file is missing or not a tokenizer; QCompileError if a GGUF needs the
            ``import`` extra that is not installed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TextDataError(f"tokenizer file not found: {path}")
    if path.suffix.lower() == ".gguf":
        return Tokenizer(_gguf_backend(path), str(path))
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:
        raise QCompileError(
            "reading tokenizer.json needs the tokenizers package: pip install qcompiler[import]"
        ) from None
    try:
        backend = Backend.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception with the parse error
        raise TextDataError(
            f"{path} is not a tokenizers JSON file: {str(err).splitlines()[0] if str(err) else err!r}"
        ) from None
    return Tokenizer(backend, str(path))


def _gguf_backend(path: Path):
    try:
        import gguf  # noqa: F401
        from transformers import AutoTokenizer
    except ImportError:
        raise QCompileError(
            f"reading the tokenizer of {path.name} needs transformers and gguf: pip install qcompiler[import]"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as err:  # transformers raises many types for a bad or unsupported GGUF
        raise TextDataError(
            f"{path}: no usable tokenizer in this GGUF file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TextDataError(f"{path}: transformers built no fast tokenizer from this GGUF file")
    return backend


def _split_point(text: str) -> int:
    """Where to cut ``text`` so both sides tokenize as they would in one piece (0: nowhere found).

    Pre-tokenizers split at whitespace runs, and byte-level BPE attaches a word's leading space to the
    word; cutting right after a lone newline, or right before a lone space, between two non-blank
    characters does not change any pre-token.
    """
    n = len(text)
    for sep, offset in (("\n", 1), (" ", 0)):
        i = n
        while (i := text.rfind(sep, 0, i)) > 0:
            if i + 1 < n and not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + offset
    return 0


def _chunks(path: Path, start: int, end: int):
    """Yields text chunks of bytes [start, end) of ``path`` (UTF-8), cut where tokenization allows."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        if start > 0:
            # Begin at a line start: never inside a UTF-8 sequence or a word.
            f.seek(start - 1)
            f.readline()
        position = f.tell()
        pending = ""
        while position < end:
            data = f.read(min(_READ_BYTES, end - position))
            if not data:
                break
            position += len(data)
            pending += decoder.decode(data)
            while len(pending) >= 2 * _CHUNK_CHARS:
                cut = _split_point(pending[:_CHUNK_CHARS]) or _CHUNK_CHARS
                yield pending[:cut]
                pending = pending[cut:]
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending


def text_windows(
    text_path: str | os.PathLike,
    tokenizer: TokenizerLike | str | os.PathLike,
    seq_len: int,
    *,
    max_windows: int | None = None,
    start_fraction: float = 0.0,
    end_fraction: float = 1.0,
) -> np.ndarray:
    """Cuts a UTF-8 text file into non-overlapping windows of ``seq_len`` tokens.

    Args:
        text_path: the text file.
        tokenizer: a tokenizer object (``encode(text) -> list[int]``) or a path for :func:`load_tokenizer`.
        seq_len: tokens per window.
        max_windows: stop after this many windows (None: as many as the range holds).
        start_fraction: where to start in the file, as a fraction of its size in bytes (moved forward to
            the next line start).
        end_fraction: where to stop, likewise.

    Returns:
        int64 array ``[n_windows, seq_len]``; trailing tokens that do not fill a window are dropped.

    Raises:
        TextDataError: missing or empty file, an empty range, or fewer tokens than one window.
    """
    path = Path(text_path)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if not 0.0 <= start_fraction < end_fraction <= 1.0:
        raise ValueError(
            f"need 0 <= start_fraction < end_fraction <= 1, got {start_fraction}, {end_fraction}"
        )
    if not path.is_file():
        raise TextDataError(f"text file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise TextDataError(f"text file {path} is empty")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    start, end = int(size * start_fraction), int(size * end_fraction)
    needed = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    batch: list[str] = []
    encode_batch = getattr(tokenizer, "encode_batch", None)

    def flush() -> None:
        if encode_batch is not None:
            for chunk_ids in encode_batch(batch):
                ids.extend(chunk_ids)
        else:
            for text in batch:
                ids.extend(tokenizer.encode(text))
        batch.clear()

    for chunk in _chunks(path, start, end):
        batch.append(chunk)
        if len(batch) >= _PARALLEL_CHUNKS or (needed is not None and _enough(batch, ids, needed)):
            flush()
            if needed is not None and len(ids) >= needed:
                break
    if batch:
        flush()
    n = len(ids) // seq_len if needed is None else min(len(ids) // seq_len, max_windows)
    where = (
        f"{path}"
        if (start_fraction, end_fraction) == (0.0, 1.0)
        else f"{path} (fraction {start_fraction:g}..{end_fraction:g})"
    )
    if n == 0:
        raise TextDataError(f"{where} holds {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None and n < max_windows:
        logger.warning("%s gives only %d windows of %d tokens (asked for %d)", where, n, seq_len, max_windows)
    logger.info("%d windows of %d tokens from %s", n, seq_len, where)
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def _enough(batch: list[str], ids: list[int], needed: int) -> bool:
    # English BPE averages ~4 characters per token; assuming 2 flushes early (and reads on if short)
    # rather than tokenizing far more text than the windows need.
    return len(ids) + sum(len(t) for t in batch) // 2 >= needed
