"""ELMo's inputs: words to character ids, the softmax's word vocabulary, batches of sentences."""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Characters. A token is `max_chars` ids: begin-of-word, its UTF-8 bytes, end-of-word, padding.
# Sentence boundaries are two extra tokens made of one special "character" each. Id 0 is padding,
# so a token of all zeros is a padding token (shorter sentences in a batch end with them).

PAD_CHAR, BOW, EOW, BOS_CHAR, EOS_CHAR = 0, 257, 258, 259, 260  # byte b has id b + 1
N_CHARS = 261


def tokenize(text: str) -> list[str]:
    """Lower-case words and punctuation marks: "The bank, too." -> ['the', 'bank', ',', 'too', '.']."""
    return re.findall(r"[\w']+|[^\w\s]", text.lower())


def _word_ids(word: str | int, max_chars: int) -> list[int]:
    inner = [word] if isinstance(word, int) else [b + 1 for b in word.encode("utf-8")][:max_chars - 2]
    ids = [BOW, *inner, EOW]  # long words are cut, keeping their end-of-word marker
    return ids + [PAD_CHAR] * (max_chars - len(ids))


def batch_to_ids(sentences: Sequence[Sequence[str] | str], max_chars: int = 16) -> Tensor:
    """Character ids (B, T + 2, max_chars) of a batch of sentences, with <s> and </s> tokens added.

    A sentence is a list of words or a string (split on whitespace). Shorter sentences end in
    padding tokens (all zeros).

    Example:
        ids = batch_to_ids([["the", "bat", "flew"], "a bat"])   # (2, 5, 16)
        ids[1, 3].eq(0).all()                                   # True: padding token
    """
    if max_chars < 3:
        raise ValueError(f"max_chars must be at least 3 (begin, one byte, end), got {max_chars}; use e.g. 16")
    words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
    if not words or not all(words):
        raise ValueError("batch_to_ids needs a non-empty list of non-empty sentences")
    T = max(len(w) for w in words) + 2
    out = torch.zeros(len(words), T, max_chars, dtype=torch.long)
    for i, sentence in enumerate(words):
        tokens = [BOS_CHAR, *sentence, EOS_CHAR]
        out[i, :len(tokens)] = torch.tensor([_word_ids(w, max_chars) for w in tokens])
    return out


class WordVocab:
    """The softmax's word vocabulary: <pad> <unk> <s> </s> and the most frequent words of a text.

    Example:
        vocab = WordVocab.from_text(mplib.data.load_text(), size=512)
        vocab.encode_batch([["the", "bat"]])   # (1, 4) word ids with <s> and </s>, -100 for padding
    """

    SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")

    def __init__(self, words: Sequence[str]):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str, size: int = 512) -> "WordVocab":
        if size <= len(cls.SPECIALS):
            raise ValueError(f"size {size} leaves no room for words next to {len(cls.SPECIALS)} specials; use e.g. 512")
        counts = Counter(tokenize(text))
        top = sorted(counts, key=lambda w: (-counts[w], w))[:size - len(cls.SPECIALS)]  # ties: alphabetical
        return cls([*cls.SPECIALS, *top])

    def __len__(self) -> int:
        return len(self.itos)

    def encode_batch(self, sentences: Sequence[Sequence[str] | str]) -> Tensor:
        """Word ids (B, T + 2) aligned with `batch_to_ids`; padding positions are -100 (ignored by the loss)."""
        words = [s.split() if isinstance(s, str) else list(s) for s in sentences]
        T = max(len(w) for w in words) + 2
        out = torch.full((len(words), T), -100, dtype=torch.long)
        unk = self.stoi["<unk>"]
        for i, sentence in enumerate(words):
            ids = [self.stoi["<s>"], *(self.stoi.get(w, unk) for w in sentence), self.stoi["</s>"]]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def sentence_batches(sentences: Sequence[str], vocab: WordVocab, batch_size: int, max_chars: int = 16,
                     generator: torch.Generator | None = None):
    """Endless batches (char_ids, word_ids) of random sentences (e.g. the lines of the corpus), tokenized.

    Example:
        batches = sentence_batches(text.splitlines(), vocab, batch_size=32)
        char_ids, word_ids = next(batches)   # (B, T, max_chars), (B, T)
    """
    sentences = [s for s in sentences if s.strip()]
    if not sentences or batch_size < 1:
        raise ValueError(f"need at least one non-empty sentence and batch_size >= 1, got {len(sentences)} "
                         f"sentences and batch_size={batch_size}")
    while True:
        pick = torch.randint(len(sentences), (batch_size,), generator=generator).tolist()
        words = [tokenize(sentences[i]) or ["<unk>"] for i in pick]
        yield batch_to_ids(words, max_chars), vocab.encode_batch(words)
