"""Corpora and tokenizers: the course's offline data in data/, or the reader's own text files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def data_path(name: str) -> Path:
    """Path of a file shipped in data/ (e.g. "corpus.txt")."""
    path = DATA / name
    if not path.exists():
        shipped = sorted(p.name for p in DATA.glob("*") if p.is_file())
        raise FileNotFoundError(f"{name!r} is not in the course's data folder; it has {shipped}. "
                                "Regenerate with `python data/generate.py`, or pass a path to your own file")
    return path


def load_text(name_or_path: str | Path = "corpus") -> str:
    """The course corpus ("corpus"), another shipped file, or any UTF-8 text file of the reader's.

    Example:
        text = mplib.data.load_text()                 # data/corpus.txt
        text = mplib.data.load_text("corpus.txt")     # a shipped file by name, or a path to your own
    """
    path = Path(name_or_path)
    if not path.exists():
        name = str(name_or_path)
        path = data_path(name if "." in name else f"{name}.txt")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path.name} is empty; a language model needs some text to learn from")
    return text


class CharTokenizer:
    """One id per distinct character of a text, in sorted order.

    Example:
        tok = CharTokenizer.from_text("hello")
        tok.decode(tok.encode("hell"))  # 'hell'
    """

    def __init__(self, chars: Sequence[str]):
        self.itos = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters {unknown[:10]} are not in this tokenizer's vocabulary of "
                             f"{self.vocab_size}; build it with CharTokenizer.from_text on text that has them")
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return "".join(self.itos[int(i)] for i in ids)


class WordTokenizer:
    """A WordPiece vocabulary trained locally with the `tokenizers` library (ships with transformers).

    The trainer breaks ties between equally frequent merges in no fixed order, so two trainings
    on the same text may give different ids: `save()` a vocabulary that a checkpoint depends on
    and `load()` it (scripts/pretrain.py does so, with a sorted word-level vocabulary).

    Example:
        tok = WordTokenizer.train(mplib.data.load_text(), vocab_size=1000)
        tok.decode(tok.encode("the farmer fed the goat."))
    """

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int = 1000, specials: Sequence[str] = SPECIALS) -> "WordTokenizer":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < len(specials) + 30:
            raise ValueError(f"vocab_size {vocab_size} is too small for {len(specials)} special tokens "
                             "plus an alphabet; use at least 100")
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                            show_progress=False)
        tok.train_from_iterator(text.splitlines(), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self._tok.decode([int(i) for i in ids])

    def tokens(self, text: str) -> list[str]:
        return self._tok.encode(text).tokens

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str())

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(Path(path).read_text()))


def lm_batches(ids: torch.Tensor | Sequence[int], batch_size: int, seq_len: int,
               generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of a token stream: x is (B, T), y is x shifted by one.

    Example:
        x, y = next(lm_batches(torch.tensor(tok.encode(text)), batch_size=8, seq_len=64))
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for windows of {seq_len}+1; "
                         "use a shorter seq_len or more text")
    while True:
        starts = torch.randint(len(ids) - seq_len, (batch_size,), generator=generator)
        x = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # (B, T)
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts.tolist()])  # (B, T)
        yield x, y


def split_stream(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / validation split of a token stream, the validation part taken from the end."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


@dataclass(frozen=True)
class SenseExample:
    """A sentence using a two-sense word; `position` indexes the word in `sentence.split()`."""

    sentence: str
    word: str
    sense: int
    position: int
    sense_name: str = ""


def _rows(name: str) -> list[dict[str, str]]:
    with data_path(name).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_senses() -> list[SenseExample]:
    """Sentences for the word-sense probe of notebook 03 (six words, two senses each)."""
    return [SenseExample(r["sentence"], r["word"], int(r["sense"]), int(r["position"]), r["sense_name"])
            for r in _rows("senses.tsv")]


def load_classification() -> dict:
    """Labelled sentences for fine-tuning: {"train": [(text, label)], "test": [...], "labels": [names]}.

    The test sentences use nouns that never occur in the training sentences, so only what a
    model learned in pre-training about those nouns lets it classify them.
    """
    out: dict = {}
    names: dict[int, str] = {}
    for split in ("train", "test"):
        rows = _rows(f"classification_{split}.tsv")
        out[split] = [(r["text"], int(r["label"])) for r in rows]
        names.update({int(r["label"]): r["label_name"] for r in rows})
    out["labels"] = [names[i] for i in sorted(names)]
    return out
