"""scripts/pretrain.py: a short run writes loadable, deterministic checkpoints; the committed ones fit."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mplib.data import WordTokenizer, load_text
from mplib.models.bert import BERT, BERTConfig
from mplib.models.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "data" / "checkpoints"
MODELS = {"bert": (BERT, BERTConfig), "gpt": (GPT, GPTConfig)}


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "scripts" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_model(path: Path, name: str) -> torch.nn.Module:
    cls, config_cls = MODELS[name]
    ckpt = torch.load(path / f"{name}_tiny.pt")
    model = cls(config_cls(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model


@pytest.fixture(scope="module")
def two_short_runs(tmp_path_factory):
    script = load_script()
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    for out in outs:
        script.main(["--steps", "2", "--out", str(out), "--no-progress"])
    return outs


@pytest.mark.slow  # two runs of the script: about 5 s on a quiet 2-core CPU
def test_short_run_writes_tokenizer_and_loadable_checkpoints(two_short_runs):
    out = two_short_runs[0]
    tok = WordTokenizer.load(out / "tokenizer.json")
    for name in MODELS:
        ckpt = torch.load(out / f"{name}_tiny.pt")
        assert ckpt["steps"] == 2 and ckpt["final_loss"] > 0
        model = load_model(out, name)
        assert model.config.vocab_size == tok.vocab_size


@pytest.mark.slow
def test_two_runs_write_identical_checkpoints(two_short_runs):
    a, b = two_short_runs
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    for name in MODELS:
        sa, sb = (torch.load(d / f"{name}_tiny.pt")["state_dict"] for d in (a, b))
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=f"{name} {key}")


def test_tokenizer_gives_every_corpus_word_one_token():
    tok = load_script().build_tokenizer(load_text())
    sentence = "the farmer fed the goat, and the tram stopped."
    assert tok.tokens(sentence) == ["the", "farmer", "fed", "the", "goat", ",", "and", "the", "tram", "stopped", "."]
    assert [tok.id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]


def test_committed_checkpoints_are_small_and_load():
    files = [CHECKPOINTS / f for f in ("tokenizer.json", "bert_tiny.pt", "gpt_tiny.pt")]
    assert all(f.exists() for f in files), "run `python scripts/pretrain.py` to write data/checkpoints/"
    assert all(f.stat().st_size < 1.5e6 for f in files)
    assert sum(f.stat().st_size for f in files) < 3e6
    tok = WordTokenizer.load(CHECKPOINTS / "tokenizer.json")
    for name in MODELS:
        assert load_model(CHECKPOINTS, name).config.vocab_size == tok.vocab_size
