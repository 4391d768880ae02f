import importlib.util
from pathlib import Path

import pytest
import torch

from mplib.models.elmo import ELMo, ELMoConfig, WordVocab, batch_to_ids, load_pretrained

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_elmo.py"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_elmo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_script_writes_a_loadable_deterministic_checkpoint(tmp_path):
    script = _script()
    threads = torch.get_num_threads()
    try:
        a = script.main(["--steps", "2", "--out", str(tmp_path / "a"), "--no-progress"])
        b = script.main(["--steps", "2", "--out", str(tmp_path / "b"), "--no-progress"])
    finally:
        torch.set_num_threads(threads)  # the script pins one thread; give the others back
    assert a.name == "elmo_tiny.pt" and a.read_bytes() == b.read_bytes()
    checkpoint = torch.load(a)
    assert checkpoint["steps"] == 2 and checkpoint["final_loss"] > 0
    model = ELMo(ELMoConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    vocab = WordVocab(checkpoint["vocab"])
    assert len(vocab) == model.config.vocab_size
    fwd, _ = model(batch_to_ids(["the bat flew"]))
    assert fwd.shape == (1, 5, len(vocab))


def test_committed_checkpoint_loads_and_stays_small():
    path = SCRIPT.parent.parent / "data" / "checkpoints" / "elmo_tiny.pt"
    assert path.stat().st_size < 1.5e6
    checkpoint = torch.load(path)
    model = ELMo(ELMoConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    assert checkpoint["steps"] >= 1000


def test_load_pretrained_returns_the_committed_model_and_vocab():
    model, vocab = load_pretrained()
    assert len(vocab) == model.config.vocab_size and vocab.itos[:4] == list(WordVocab.SPECIALS)
    with pytest.raises(FileNotFoundError, match="scripts/pretrain_elmo.py"):
        load_pretrained("no/such/elmo.pt")
