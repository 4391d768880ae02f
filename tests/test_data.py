import subprocess
import sys

import pytest
import torch

import mplib.data as data


def test_committed_data_equals_a_fresh_generator_run():
    result = subprocess.run([sys.executable, str(data.DATA / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_data_is_small_enough_to_commit():
    total = sum(p.stat().st_size for p in data.DATA.rglob("*") if p.is_file())
    assert 0 < total < 5_000_000


def test_char_tokenizer_round_trips_the_corpus():
    text = data.load_text()
    tok = data.CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text[:2000])) == text[:2000]


def test_char_tokenizer_names_unknown_characters():
    tok = data.CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\['z'\]"):
        tok.encode("az")


def test_word_tokenizer_keeps_every_category_noun_whole(tmp_path):
    tok = data.WordTokenizer.train(data.load_text(), vocab_size=1000)
    for text, _ in data.load_classification()["test"]:
        assert "[UNK]" not in tok.tokens(text)
    noun = data.load_classification()["test"][0][0].split()[-1]
    assert tok.tokens(noun) == [noun]
    tok.save(tmp_path / "tok.json")
    again = data.WordTokenizer.load(tmp_path / "tok.json")
    assert again.encode("the farmer fed the goat.") == tok.encode("the farmer fed the goat.")
    assert tok.id("[MASK]") == 4


def test_lm_batches_shift_targets_by_one():
    ids = torch.arange(100)
    x, y = next(data.lm_batches(ids, batch_size=3, seq_len=10, generator=torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (3, 10)
    torch.testing.assert_close(y, x + 1)


def test_lm_batches_rejects_a_stream_shorter_than_a_window():
    with pytest.raises(ValueError, match="too short"):
        next(data.lm_batches(torch.arange(5), batch_size=1, seq_len=10))


def test_classification_test_nouns_never_occur_in_training_sentences():
    cls = data.load_classification()
    train_words = {w for text, _ in cls["train"] for w in text.split()}
    test_nouns = {text.split()[-1] for text, _ in cls["test"] if text.startswith("we could not forget")}
    assert test_nouns and not (test_nouns & train_words)
    assert cls["labels"] == ["food", "animal", "vehicle", "tool"]
    assert {label for _, label in cls["train"]} == {0, 1, 2, 3}


def test_senses_mark_the_word_position_and_both_senses():
    rows = data.load_senses()
    assert all(r.sentence.split()[r.position] == r.word for r in rows)
    for word in {r.word for r in rows}:
        assert {r.sense for r in rows if r.word == word} == {0, 1}


def test_load_text_reads_the_readers_own_file(tmp_path):
    (tmp_path / "mine.txt").write_text("to be or not to be\n")
    assert data.load_text(tmp_path / "mine.txt").startswith("to be")
    with pytest.raises(FileNotFoundError, match="own file"):
        data.load_text("no_such_corpus")
