"""Tensor (intra-layer) parallelism as in Megatron-LM: every weight matrix split over T ranks.

One module code, two ways to communicate: T ranks in one process over devices (GPUs or CPU
stand-ins; `LocalGroup`) or one rank per process over torch.distributed (`DistGroup`).

    group.py        who talks to whom: a rank of a group, its collectives, over torch.distributed
    local.py        T ranks as threads of one process; the collectives computed across the shards
    mappings.py     the f and g operators of the paper, and their sequence-parallel kin
    layers.py       column/row-parallel linear, vocabulary-parallel embedding and cross-entropy
    models.py       attention of mplib's GPT and BERT on this rank's heads
    plans.py        which module of GPT, BERT, HF GPT-2, Llama is split how; checks before any weight moves
    sequence.py     sequence parallelism between the split matmuls
    parallelize.py  parallelize(model, devices_or_group), TensorParallel, unsplit state dicts, memory
    trace.py        every collective counted, and a timeline per rank
    predict.py      a TP step simulated from per-layer compute and a link (mplib.hardware)

Example:
    tp = mplib.tensor_parallel.parallelize(GPT(GPT_TINY), mplib.env.get_devices(2))
    with mplib.tensor_parallel.trace(tp) as tr:
        tp(idx).sum().backward()
    tr.by_layer()["h.0"]     # 2 all-reduces forward, 2 backward
"""

from mplib.tensor_parallel.group import Collective, DistGroup, Group
from mplib.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, Split, VocabParallelEmbedding,
                                          vocab_parallel_cross_entropy)
from mplib.tensor_parallel.local import LocalGroup
from mplib.tensor_parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                            reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)
from mplib.tensor_parallel.parallelize import (TensorParallel, memory, parallelize, split_names, unsplit_grads,
                                               unsplit_state_dict)
from mplib.tensor_parallel.predict import collective_seconds, layer_collectives, simulate
from mplib.tensor_parallel.trace import Trace, merge, trace

__all__ = ["Collective", "ColumnParallelLinear", "DistGroup", "Group", "LocalGroup", "RowParallelLinear", "Split",
           "TensorParallel", "Trace", "VocabParallelEmbedding", "collective_seconds", "copy_to_tp", "gather_from_sp",
           "gather_from_tp", "layer_collectives", "memory", "merge", "parallelize", "reduce_from_tp",
           "reduce_scatter_to_sp", "scatter_to_sp", "scatter_to_tp", "simulate", "split_names", "trace",
           "unsplit_grads", "unsplit_state_dict", "vocab_parallel_cross_entropy"]
