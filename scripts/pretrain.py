"""Pre-train the tiny BERT (masked LM) and GPT (causal LM) of notebooks 04 and 05 on data/corpus.txt.

Pre-training takes minutes on a CPU, too long for a notebook in CI, so this script does it once
and writes small checkpoints that the notebooks load:

    python scripts/pretrain.py                    # writes data/checkpoints/{tokenizer.json,bert_tiny.pt,gpt_tiny.pt}
    python scripts/pretrain.py --steps 20 --out /some/dir   # a quick smoke run

Deterministic: the same seed, steps and thread count give the same files on the same machine
(the tokenizer lists every corpus word in sorted order, so its ids never change either).
Each checkpoint is {"config": dict, "state_dict": ..., "steps": int, "final_loss": float}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

import mplib.env
from mplib.data import SPECIALS, WordTokenizer, lm_batches, load_text
from mplib.models.bert import BERT, BERTConfig, encode_batch, mask_tokens
from mplib.models.gpt import GPT, GPTConfig
from mplib.train import fit, lm_loss

ROOT = Path(__file__).resolve().parent.parent
BERT_CONFIG = dict(block_size=32, n_layer=2, n_head=4, n_embd=64, intermediate_size=256, dropout=0.0)
GPT_CONFIG = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


def build_tokenizer(text: str) -> WordTokenizer:
    """A WordPiece tokenizer whose vocabulary is every word of `text` (~500), plus single characters.

    Why not `WordTokenizer.train`: the tokenizers library breaks ties between equally frequent
    merges differently from run to run, so the vocabulary (and every token id in the checkpoints)
    would change. Listing the words in sorted order gives the same ids every run, one per word.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = sorted({w for line in text.lower().splitlines() for w, _ in
                    pre_tokenizers.BertPreTokenizer().pre_tokenize_str(line)})
    chars = sorted({c for w in words for c in w})
    pieces = [*SPECIALS, *chars, *(f"##{c}" for c in chars), *(w for w in words if w not in chars)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIALS))  # "[MASK]" in a text is one token, and decode skips them
    return WordTokenizer(tok)


def mlm_batches(tok: WordTokenizer, sentences: list[str], batch_size: int, max_len: int, generator: torch.Generator):
    """Endless masked-LM batches ((inputs, attention_mask), labels) of random corpus sentences."""
    specials = [tok.id(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
    all_ids, all_mask = encode_batch(tok, sentences, max_len)  # tokenize once: (N, T) each
    while True:
        pick = torch.randint(len(sentences), (batch_size,), generator=generator)
        ids, mask = all_ids[pick], all_mask[pick]
        T = int(mask.sum(1).max())  # drop the columns that are padding in every row
        inputs, labels = mask_tokens(ids[:, :T], tok.id("[MASK]"), tok.vocab_size, specials, generator=generator)
        yield (inputs, mask[:, :T]), labels


def pretrain_bert(tok: WordTokenizer, text: str, steps: int, progress: bool) -> tuple[BERT, float]:
    model = BERT(BERTConfig(vocab_size=tok.vocab_size, **BERT_CONFIG))
    batches = mlm_batches(tok, text.splitlines(), 64, BERT_CONFIG["block_size"], torch.Generator().manual_seed(1))
    history = fit(model, batches, lambda m, b: lm_loss(m(*b[0]), b[1]), steps=steps, lr=2e-3,
                  progress=progress, log_every=20)
    return model, history.mean_last(20)


def pretrain_gpt(tok: WordTokenizer, text: str, steps: int, progress: bool) -> tuple[GPT, float]:
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **GPT_CONFIG))
    ids = torch.tensor(tok.encode(text))
    batches = lm_batches(ids, 32, GPT_CONFIG["block_size"], torch.Generator().manual_seed(2))
    history = fit(model, batches, lambda m, b: lm_loss(m(b[0]), b[1]), steps=steps, lr=2e-3,
                  progress=progress, log_every=20)
    return model, history.mean_last(20)


def save(model: torch.nn.Module, steps: int, loss: float, path: Path) -> None:
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
                "steps": steps, "final_loss": loss}, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "checkpoints")
    parser.add_argument("--steps", type=int, default=None, help="steps for both models (default: each its own)")
    parser.add_argument("--bert-steps", type=int, default=800)
    parser.add_argument("--gpt-steps", type=int, default=1000)
    parser.add_argument("--which", choices=("both", "bert", "gpt"), default="both")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    mplib.env.seed_everything(0)
    text = load_text()
    tok = build_tokenizer(text)
    tok.save(args.out / "tokenizer.json")
    for name, train, steps in (("bert", pretrain_bert, args.bert_steps), ("gpt", pretrain_gpt, args.gpt_steps)):
        if args.which not in ("both", name):
            continue
        steps = args.steps or steps
        start = time.perf_counter()
        mplib.env.seed_everything(0)
        model, loss = train(tok, text, steps, not args.no_progress)
        save(model, steps, loss, args.out / f"{name}_tiny.pt")
        print(f"{name}: {steps} steps, final loss {loss:.3f}, {time.perf_counter() - start:.0f} s, "
              f"{(args.out / f'{name}_tiny.pt').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
