"""Every `Example:` in a public docstring of the modules below runs, and its stated results hold.

An example runs in its module's namespace, with the names a course notebook has imported
(`GPT`, `GPT_TINY`, `split`, `Pipeline`, `lm_loss`, ...) and the small objects its text names
(`model`, `x`, `costs`, `llama`, ...), built here from tiny configs. A line `expr  # <literal>` asserts that `expr` equals
the literal (a tensor or a size compares as a list or tuple); `# e.g. ...` and prose comments
are not checked. A line `stmt  # SomeError: ...` must raise SomeError.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import re
import textwrap
from fractions import Fraction

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

import mplib
import mplib.wavefront

matplotlib.use("Agg")

# The modules whose examples this test runs (the rest of mplib: see the note at the end).
MODULES = [
    "mplib.data", "mplib.env", "mplib.microbatch", "mplib.models.bert", "mplib.models.elmo",
    "mplib.models._elmo_inputs", "mplib.models.gpt", "mplib.models.rnn", "mplib.partition",
    "mplib.profile", "mplib.schedule", "mplib.simulate", "mplib.timeline", "mplib.train",
    "mplib.transfer", "mplib.widgets", "mplib.worker", "mplib.layers",
    "mplib.tensor_parallel.group", "mplib.tensor_parallel.layers", "mplib.tensor_parallel.local",
    "mplib.tensor_parallel.parallelize", "mplib.tensor_parallel.predict", "mplib.tensor_parallel.trace",
    "mplib.pipeline", "mplib.split", "mplib._plot_memory", "mplib._runner", "mplib.hf", "mplib._hf_split",
    "mplib.wavefront", "mplib.speedups", *(f"mplib.speedups.{m}" for m in (
        "freezing", "memory", "offload", "lowrank", "distill", "pruning", "precision", "harness")),
    "mplib.distributed", *(f"mplib.distributed.{m}" for m in (
        "launch", "mesh", "checks", "schedules", "stages", "pipeline", "checkpoint", "clock", "weighting")),
    "mplib.memory", "mplib.hardware", "mplib.plot", "mplib._plot_plan", "mplib.exercises",
]
# An example headed "Example (several processes):" needs a process group (torchrun or
# mplib.distributed.launch); the examples of these modules run inside a LocalGroup's ranks.
SEVERAL_PROCESSES = "several processes"
IN_RANKS = ("mplib.tensor_parallel.layers",)
_HEADING = re.compile(r"^Example(?: \(([^)]*)\))?:\n((?:[ \t]+.*\n?|[ \t]*\n)+)", re.M)
_ERROR = re.compile(r"#\s*([A-Z]\w*(?:Error|Exception))\b")


def _examples(module_name: str) -> list[tuple[str, str, str]]:
    """(qualified name, condition, code) of each public object's example in the module, methods included;
    the module's own docstring example (a package's __init__) is named "__doc__"."""
    module = importlib.import_module(module_name)
    found, seen = [], set()
    match = _HEADING.search(inspect.cleandoc(module.__doc__ or ""))
    if match:
        found.append(("__doc__", match.group(1) or "", textwrap.dedent(match.group(2)).strip()))
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{k}", v) for k, v in vars(obj).items()
                        if not k.startswith("_") and (callable(v) or isinstance(v, (property, classmethod, staticmethod)))]
        for qualname, member in members:
            doc = getattr(member.fget if isinstance(member, property) else member, "__doc__", None)
            match = _HEADING.search(inspect.cleandoc(doc or ""))  # its own docstring, not one inherited
            if match and id(member) not in seen:
                seen.add(id(member))
                found.append((qualname, match.group(1) or "", textwrap.dedent(match.group(2)).strip()))
    return found


CASES = [pytest.param(m, q, code, id=f"{m}.{q}",
                      marks=[pytest.mark.skip(reason="needs a process group")] if cond == SEVERAL_PROCESSES else [])
         for m in MODULES for q, cond, code in _examples(m)]


def _fixtures() -> dict:
    """The objects examples name, tiny: a GPT and its batch, a character tokenizer, costs, ..."""
    from mplib.data import CharTokenizer, load_text
    from mplib.models.gpt import GPT, GPT_TINY
    from mplib.profile import BlockCosts

    text = load_text()[:4000]
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text))
    model = GPT(dataclasses.replace(GPT_TINY, vocab_size=tok.vocab_size))
    x, y = ids[:64].view(4, 16), ids[1:65].view(4, 16)
    costs = BlockCosts(forward=[1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 2e-3], backward=[2e-3, 4e-3, 2e-3, 6e-3, 2e-3, 4e-3],
                       param_bytes=[400, 100, 100, 100, 100, 400])
    return dict(text=text, tok=tok, ids=ids, model=model, x=x, y=y, costs=costs, mask=torch.ones(4, 16, dtype=torch.bool),
                block=nn.Linear(8, 8), batches=[(x, y)] * 3, loss_fn=lambda m, b: mplib.train.lm_loss(m(b[0]), b[1]),
                devices=mplib.env.get_devices(2), hidden=torch.randn(4, 16, 8), idx=x)


def _reader_names() -> dict:
    """What a course notebook has imported by the time it calls mplib."""
    from mplib.models.bert import BERT, BERT_TINY
    from mplib.models.gpt import GPT, GPT2_SMALL, GPT2_XL, GPT_TINY
    from mplib.train import lm_loss

    return dict(GPT=GPT, GPT_TINY=GPT_TINY, GPT2_SMALL=GPT2_SMALL, GPT2_XL=GPT2_XL, BERT=BERT, BERT_TINY=BERT_TINY,
                split=mplib.split.split, Pipeline=mplib.Pipeline, lm_loss=lm_loss)


def _hf_fixtures(ns: dict) -> None:
    """A tiny Llama and GPT-2 from configs, a split of the Llama, an HF batch with labels."""
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, \
        OPTForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (4, 8))
    ns.update(config=config, llama=llama, LlamaForCausalLM=LlamaForCausalLM, ids=ids, labels=ids.clone(),
              GPT2Config=GPT2Config, GPT2LMHeadModel=GPT2LMHeadModel, DynamicCache=DynamicCache,
              opt_model=OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                 num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)),
              gpt2=GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)),
              split_model=mplib.split.split(llama, ["cpu", "cpu"]),
              tokenizer_batch={"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})


def _module_fixtures(module_name: str, ns: dict) -> None:
    """Objects some modules' examples mean by a name the others use for something else."""
    if module_name == "mplib.models.rnn":
        from mplib.models.rnn import CHAR_LSTM_TINY, CharRNN

        ns["model"] = CharRNN(dataclasses.replace(CHAR_LSTM_TINY, vocab_size=ns["tok"].vocab_size))
        ns["x"] = torch.randn(4, 10, 8)
        ns["torch_lstm"], ns["ours"] = nn.LSTM(8, 16, num_layers=2, batch_first=True), None
        from mplib.models.rnn import from_torch

        ns["ours"] = from_torch(nn.LSTM(8, 16, num_layers=2, batch_first=True))
    if module_name == "mplib.models.bert":
        from mplib.data import WordTokenizer
        from mplib.models.bert import BERT, BERT_TINY

        ns["model"] = BERT(BERT_TINY)
        ns["bert"] = ns["model"]
        ns["tok"] = WordTokenizer.train(ns["text"], vocab_size=BERT_TINY.vocab_size)
        ns["ids"], ns["mask"] = torch.randint(5, BERT_TINY.vocab_size, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
        ns["attention_mask"] = ns["mask"]
    if module_name in ("mplib.models.elmo", "mplib.models._elmo_inputs"):
        from mplib.models.elmo import ELMO_TINY, ELMo, WordVocab

        ns["model"] = ELMo(ELMO_TINY)
        ns["sents"] = [["the", "bat", "flew"], ["a", "bat"]]
        ns["vocab"] = WordVocab.from_text(ns["text"], size=ELMO_TINY.vocab_size if hasattr(ELMO_TINY, "vocab_size") else 512)
        ns["reps"] = torch.randn(2, 3, 5, 16)
    if module_name == "mplib.microbatch":
        ns["ids"] = torch.randint(0, ns["tok"].vocab_size, (8, 16))
        ns["mask"] = torch.ones(8, 16, dtype=torch.bool)
    if module_name == "mplib.timeline":
        ns["x"] = torch.randn(4, 8)
    if module_name.startswith("mplib.tensor_parallel"):
        from mplib.models.gpt import GPT, GPT_TINY
        from mplib.tensor_parallel import parallelize

        ns.update({k: getattr(mplib.tensor_parallel, k) for k in mplib.tensor_parallel.__all__})
        ns["tp"] = parallelize(GPT(GPT_TINY), ["cpu", "cpu"])
    if module_name == "mplib.tensor_parallel.layers":
        ns["x"], ns["y_i"] = torch.randn(2, 4, 32), torch.randn(2, 4, 64)
        ns["ids"], ns["y"] = torch.randint(0, 512, (2, 4)), torch.randint(0, 512, (2, 4))
    if module_name == "mplib.layers":
        ns["embed"], ns["head"] = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        ns["head"].weight = ns["embed"].weight
    if module_name in ("mplib.hf", "mplib._hf_split", "mplib.split", "mplib.pipeline"):
        _hf_fixtures(ns)
    if module_name in ("mplib.pipeline", "mplib._runner", "mplib.plot"):
        ns["model"] = mplib.split.split(ns["model"], ["cpu", "cpu"])
        ns["pipe"] = ns["pipeline"] = mplib.Pipeline(ns["model"], chunks=2, loss_fn=mplib.train.lm_loss, seed=0)
        ns["optimizer"] = torch.optim.SGD(ns["model"].parameters(), lr=0.1)
        ns["ids"] = ns["x"]
    if module_name == "mplib.split":
        ns["model"] = mplib.split.split(ns["model"], ["cpu", "cpu"])
    if module_name == "mplib.plot":
        ns["pipeline"].step(ns["x"], ns["y"])
        ns["vectors"] = torch.randn(3, 8)
        ns["x"] = torch.randn(2, 5, 4, requires_grad=True)
        ns["x"].sum().backward()
    if module_name in ("mplib.plot", "mplib._plot_plan"):
        from mplib.partition import evaluate, optimal, uniform
        from mplib.schedule import build
        from mplib.simulate import simulate

        ns["even"], ns["best"] = evaluate(ns["costs"], uniform(6, 2), 2, chunks=4), optimal(ns["costs"], 2, chunks=4)
        ns["tl_uniform"], ns["tl_optimal"] = (simulate(build("1f1b", 2, 4), p.forward, p.backward)
                                              for p in (ns["even"], ns["best"]))
    if module_name == "mplib._plot_memory":
        ns["est"] = mplib.memory.estimate(mplib.models.gpt.GPT2_XL, batch=8, seq=1024)
    if module_name == "mplib.wavefront":
        _wavefront_fixtures(ns)
    if module_name.startswith("mplib.speedups"):
        _speedups_fixtures(ns)
    if module_name == "mplib.distributed.checkpoint":  # what save(pipe, "ckpt/step-100") wrote, from one process
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(ns["GPT"](ns["GPT_TINY"]).state_dict(), checkpoint_id="ckpt/step-100", no_dist=True)
    if module_name == "mplib.transfer":
        ns["model_output"] = {"logits": torch.randn(2, 3)}


def _wavefront_fixtures(ns: dict) -> None:
    """A two-layer LSTM stack, its batch and regression targets, and a Wavefront of it over two workers."""
    from mplib.models.rnn import RNNConfig, StackedLayer, StackedRNN
    from mplib.schedule import action_times

    torch.manual_seed(0)
    stack = StackedRNN(RNNConfig(n_embd=8, hidden_size=16, n_layer=2, cell="lstm"))
    mse = nn.functional.mse_loss
    ns.update(stack=stack, x=torch.randn(4, 16, 8), y=torch.randn(4, 16, 16), mse=mse, StackedLayer=StackedLayer,
              StackedRNN=StackedRNN, action_times=action_times,
              wf=mplib.wavefront.Wavefront(mplib.split.split(stack.layers, ["cpu", "cpu"]), time_chunks=8, loss_fn=mse,
                           threads_per_worker=1),
              optimizer=torch.optim.SGD(stack.parameters(), lr=0.1))


def _speedups_fixtures(ns: dict) -> None:
    """A tiny BERT classifier (4 heads, 2 layers) and its labelled batch, a teacher, costs of 10 blocks."""
    from mplib.models.bert import BERTConfig, BertClassifier
    from mplib.profile import BlockCosts
    from mplib.speedups.harness import Result

    torch.manual_seed(0)
    config = BERTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=32, intermediate_size=64,
                        dropout=0.0)
    model, teacher = BertClassifier(config, num_labels=3), BertClassifier(config, num_labels=3)
    ids, mask, y = torch.randint(1, 128, (4, 16)), torch.ones(4, 16, dtype=torch.bool), torch.tensor([0, 1, 2, 1])
    f = [1e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3, 3e-3]
    ns.update(config=config, model=model, teacher=teacher, ids=ids, mask=mask, x=ids, y=y, F=nn.functional,
              batches=[(ids, mask, y)] * 2, loss_fn=lambda logits, labels: nn.functional.cross_entropy(logits, labels),
              costs=BlockCosts(forward=f, backward=[2 * t for t in f], param_bytes=[400] + [100] * 8 + [400]),
              blocks=nn.Sequential(*(nn.Linear(8, 8) for _ in range(10))),
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              results=[Result("fp32", "inference", 0.010, 40_000, 0.91, "fp32"),
                       Result("int8", "inference", 0.004, 12_000, 0.90, "fp32", speedup=2.5, memory_ratio=0.3)])


def _literal(comment: str):
    """The value a result comment states, or None when it states none (prose, 'e.g.', ...)."""
    text = comment.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        m = re.fullmatch(r"(Fraction\(\s*-?\d+\s*,\s*\d+\s*\))(?:\s.*)?", text)
        if m:
            return eval(m.group(1), {"Fraction": Fraction})
        m = re.fullmatch(r"(array\(\[[\d., ]+\]\))(?:\s.*)?", text)
        if m:
            return ast.literal_eval(m.group(1)[len("array("):-1])
        return None


def _same(value, stated) -> bool:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(stated, float) or isinstance(value, float):
        return value == pytest.approx(stated, rel=1e-3)
    return value == stated


def _run(code: str, ns: dict) -> None:
    """Run the example statement by statement, checking stated results and stated errors."""
    tree = ast.parse(code)
    lines = code.splitlines()
    ends = [node.end_lineno for node in tree.body]
    for i, node in enumerate(tree.body):
        last = lines[node.end_lineno - 1]
        final = i + 1 == len(ends) or ends[i + 1] != node.end_lineno  # a comment speaks of its line's last statement
        comment = last.split("#", 1)[1] if "#" in last and final else ""
        error = _ERROR.match("#" + comment)
        src = ast.get_source_segment(code, node)
        if error:
            with pytest.raises(ns.get(error.group(1)) or getattr(builtins, error.group(1))):  # the error named
                exec(compile(src, "<example>", "exec"), ns)
            continue
        stated = _literal(comment) if isinstance(node, ast.Expr) and comment else None
        if stated is None:
            exec(compile(src, "<example>", "exec"), ns)
            continue
        value = eval(compile(src, "<example>", "eval"), ns)
        assert _same(value, stated), f"{src} gave {value!r}, the docstring says {stated!r}"


@pytest.mark.parametrize("module_name, qualname, code", CASES)
def test_example_runs(module_name: str, qualname: str, code: str, tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(module_name)
    ns = {**vars(module), "mplib": mplib, "torch": torch, "nn": nn, "np": np, "plt": plt,
          "dataclasses": dataclasses, **_reader_names(), **_fixtures()}
    _module_fixtures(module_name, ns)
    try:
        if module_name in IN_RANKS:
            from mplib.tensor_parallel import LocalGroup

            LocalGroup(["cpu", "cpu"]).run(lambda g: _run(code, {**ns, "group": g}), replicated=False)
        else:
            _run(code, ns)
    finally:
        plt.close("all")


def test_every_listed_module_has_examples() -> None:
    """The collector finds the examples (a broken pattern would make every case vanish)."""
    counts = {m: len(_examples(m)) for m in MODULES}
    assert [f"{m}.{q}" for m in MODULES for q, cond, _ in _examples(m) if cond] == [  # those that cannot run here
        "mplib.tensor_parallel.group.DistGroup", "mplib.distributed.__doc__", "mplib.distributed.launch.launch",
        "mplib.distributed.launch.init", "mplib.distributed.mesh.mesh", "mplib.distributed.mesh.subgroup",
        "mplib.distributed.checks.agree", "mplib.distributed.stages.stages",
        "mplib.distributed.pipeline.DistributedPipeline", "mplib.distributed.pipeline.DistributedPipeline.step",
        "mplib.distributed.pipeline.DistributedPipeline.gather_timeline", "mplib.distributed.checkpoint.state_dict",
        "mplib.distributed.checkpoint.save", "mplib.distributed.checkpoint.load", "mplib.distributed.clock.offset",
        "mplib.distributed.clock.common_start"]
    assert {cond for m in MODULES for _, cond, _ in _examples(m)} == {"", SEVERAL_PROCESSES}
    assert all(counts.values()), counts
    assert sum(counts.values()) >= 60
