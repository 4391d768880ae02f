"""Checkable exercises: a reader's answer compared with a stored hash of the right one, with a hint.

The right answers are not in the notebooks or here, only their hashes, so reading the cell does
not give them away; tests/test_exercises.py computes every one from mplib and checks both ways.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

Answer = Any  # a number, a string, or a tuple/list of those


@dataclass(frozen=True)
class Exercise:
    """One stored exercise: the hash of its normalised answer, how numbers are rounded, a hint.

    `step` is the grid numbers are rounded to (1 for exact integers, 0.01 for two decimals): an
    answer within one step of the right one passes. Strings compare stripped and lower-cased.
    """

    digest: str
    hint: str
    step: float = 1.0


def _norm(value: Answer, step: float) -> list[str]:
    """Every normal form `value` may take: numbers round down and up to the grid of `step`."""
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            return [repr(value)]
        k = value / step
        return sorted({str(int(math.floor(k + 1e-9))), str(int(math.ceil(k - 1e-9)))})
    if isinstance(value, str):
        return [" ".join(value.strip().lower().split())]
    if isinstance(value, (tuple, list)):
        forms = [""]
        for item in value:  # every combination of its items' forms (a few at most)
            forms = [f"{f}|{g}" for f in forms for g in _norm(item, step)]
        return [f"({f})" for f in forms]
    if hasattr(value, "item"):  # a one-element tensor or numpy scalar
        return _norm(value.item(), step)
    raise TypeError(f"an answer is a number, a string or a tuple/list of those, got {type(value).__name__}")


def digest(name: str, answer: Answer, step: float = 1.0) -> str:
    """The hash stored for `answer` to exercise `name` (what an author puts in `EXERCISES`).

    Example:
        digest("00.mib", 100, step=0.1)   # a 16-digit hex string
    """
    forms = _norm(answer, step)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        forms = [str(round(answer / step))]  # the right answer is stored at its nearest grid point
    return hashlib.sha256(f"{name}:{forms[0]}".encode()).hexdigest()[:16]


def is_right(name: str, answer: Answer, step: float = 1.0) -> bool:
    """Whether `answer` to exercise `name` matches its stored hash (within one `step`), silently.

    `name` is a stored exercise's name, or a hash made by `digest("", answer, step)` for an
    exercise kept in the notebook itself (then `step` is the one it was made with).

    Example:
        is_right("01.rnn_params", 6272)   # True
    """
    ex, salt = _lookup(name, step)
    return any(hashlib.sha256(f"{salt}:{f}".encode()).hexdigest()[:16] == ex.digest
               for f in _norm(answer, ex.step))


def check(name: str, answer: Answer, step: float = 1.0, hint: str = "") -> None:
    """Print whether `answer` to exercise `name` (or a bare hash, see `is_right`) is right, with a hint if not.

    Returns nothing, so a notebook cell ending in `check(...)` shows only the message; use
    `is_right` for the boolean.

    Example:
        check("01.rnn_params", 6272)   # prints "01.rnn_params: right"
    """
    if answer is None or answer is ...:
        print(f"{name}: replace the placeholder with your answer, then run the cell again")
        return
    ex, _ = _lookup(name, step)
    right = is_right(name, answer, step)
    print(f"{name}: right" if right else f"{name}: not yet ({answer!r}). Hint: {hint or ex.hint}")


def _lookup(name: str, step: float) -> tuple[Exercise, str]:
    """The exercise and the salt its hash was made with (its name; "" for a bare hash)."""
    if name in EXERCISES:
        return EXERCISES[name], name
    if len(name) == 16 and all(c in "0123456789abcdef" for c in name):
        return Exercise(name, "work through the section above again, step by step.", step), ""
    raise KeyError(f"no exercise named {name!r}; the stored ones are {sorted(EXERCISES)}, "
                   "or pass a hash made by mplib.exercises.digest('', answer, step)")


# The answers' hashes; their values are computed from mplib in tests/test_exercises.py.
EXERCISES: dict[str, Exercise] = {
    "00.mib": Exercise("ceb9478e69c56170", "a MiB is 2**20 bytes and a float32 takes 4 bytes; answer to one decimal.",
                       0.1),
    "00.mb": Exercise("59f6b0bbb9b9bd66", "an MB is 10**6 bytes, fewer than a MiB, so there are more of them; "
                      "answer to one decimal.", 0.1),
    "01.rnn_params": Exercise("4e6ecb5fd66d9788", "W_ih is (H, C), W_hh is (H, H), and mplib keeps two biases of H "
                              "each, as torch does."),
    "01.charrnn_params": Exercise("3db8d32a4cd1a349", "embedding V x n_embd, one RNN layer (two weights, two biases), "
                                  "and a head H x V with its bias; V is tok.vocab_size."),
    "02.param_growth": Exercise("024ab67daf83f541", "an LSTM layer has 4 gates: 4H(C + H) weights plus 2 x 4H "
                                "biases; layer 1 reads C = H; answer the ratio to two decimals.", 0.01),
    "02.heavier_device": Exercise("053e53f36fda7967", "answer 0 or 1; add up est.per_block[...].activations over "
                                  "each device's blocks (the head's logits are large)."),
    "03.changed_counts": Exercise("941c32ba111a554a", "answer (forward, backward); count <s> and </s> too: the "
                                  "sentence has 9 positions, the changed word is at position 3."),
    "03.top_weight": Exercise("88b58ebb0a3fb7a4", "softmax of the scalars: exp(1) / (exp(0) + exp(1) + exp(1)), "
                              "to two decimals.", 0.01),
    "04.attention_mib": Exercise("116d1c93e5aba1ef", "one score per (sequence, head, query, key): B x n_head x T x T "
                                 "floats of 4 bytes, in MiB (2**20 bytes).", 1),
    "04.tiny_params": Exercise("29276bbc3287ee1e", "embeddings (word, position, token type, a layer norm); per "
                               "layer four C x C attention projections, C x I and I x C MLP weights, all with "
                               "biases, two layer norms; the head's C x C transform, its norm and the decoder's "
                               "bias (its weight is the word embedding)."),
    "05.mixed_parts": Exercise("60f58ca8f9ad2b65", "answer (the part that grows, the part that halves) with names "
                               "from est.gib(): 'params', 'grads', 'optimizer', 'activations'; mixed precision "
                               "adds fp32 master weights, and only what is stored per token depends on the batch."),
    "05.kv_cache_mib": Exercise("eab49e75d0f485bd", "keys and values (2) x n_layer x T x n_embd floats of 4 bytes "
                                "(the heads split n_embd, they do not add to it), in MiB (2**20 bytes)."),
    "06.mixed_bytes": Exercise("4b536d265cf67a5c", "bf16 weight (2) and gradient (2), fp32 master weight (4), "
                               "Adam's m and v in fp32 (4 + 4)."),
    "06.layer_mib": Exercise("df9a59d53365298b", "use the per-layer formula of section 2 (fused attention): "
                             "4 B T (16 C + 4 + n_head) bytes, to one decimal in MiB.", 0.1),
    "06.largest_batch": Exercise("f1abd69292d19a8d", "(A100 bytes - model state) // activations of one sequence; "
                                 "model state does not grow with the batch."),
    "06.h100s_gpt3": Exercise("2db57fa447ce76b7", "estimate GPT-3 at batch 1, sequence 2048, then divide its total "
                              "by one H100's memory (80 GiB) and round up; at batch 8 it was 47."),
    "07.counted_tokens": Exercise("400c2c9b5029e8a9", "answer a tuple of 4: each micro-batch holds 2 rows; a causal "
                                  "LM shifts its labels by one, so a row counts the labels after its first that "
                                  "are not -100 (row 1 is padded from 90, row 5 from 40)."),
    "07.token_share": Exercise("30a9e994ea77547c", "micro-batch 2's counted tokens over the batch's (the sum of "
                               "the four counts), to two decimals.", 0.01),
    "08.min_chunks": Exercise("3a169c19d4508290", "solve (K - 1) / (M + K - 1) < 0.1 for the smallest whole M."),
    "08.peak_in_flight": Exercise("48141eb331d81700", "answer (GPipe, 1F1B): GPipe runs every forward before the "
                                  "first backward; 1F1B starts backwards after K forwards on stage 0."),
    "09.peak_in_flight": Exercise("4c6c889c20309786", "answer (GPipe, 1F1B) for K = 2, M = 4 on device 0: "
                                  "compare build('gpipe', 2, 4).peak_in_flight() with 1F1B's."),
    "09.textbook": Exercise("3c8cc85b7623de27", "(M - 1) x the slowest stage + the sum of all stages, M = 4.", 0.1),
    "10.tp_bytes": Exercise("8992b7e6e59c2c20", "count the all-reduces of one layer (section 3, forward and backward); a "
                            "ring all-reduce sends 2 (T-1)/T of its tensor per rank, and the tensor is B x S x C x 2 "
                            "bytes."),
    "13.frozen_by_99": Exercise("19e83c645779c636", "blocks 0 to 8 freeze evenly spaced between step 50 and step 100; "
                                "count those at or before 99."),
    "15.gnmt_step": Exercise("b0a52bed3cb533c8", "device 0 runs both halves of the bidirectional layer, the right-to-left "
                             "one first (section 8); count the forward's cell-steps, then add the backward, the "
                             "forward's mirror image at twice the cost."),
}
