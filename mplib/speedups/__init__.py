"""Higher throughput, lower latency (chapter 8): freezing, checkpointing and offload, low-rank, distillation,
pruning and reduced bit widths, each measured by one harness for time, counted memory and quality.

One module per technique: `freezing`, `offload` (checkpointing, activation and optimizer offload),
`memory` (what `mplib.memory.estimate` predicts each one saves), `lowrank`, `distill`, `pruning`,
`precision`, `harness`. The functions most readers want are importable from here.

Example:
    import mplib.speedups as sp
    sp.freeze(model, 2); plan = sp.replan(costs, 2, devices=2, chunks=4)
    fast = sp.quantize_dynamic(model.eval())
"""

from mplib.speedups import distill, freezing, harness, lowrank, memory, offload, precision, pruning  # noqa: F401
from mplib.speedups.distill import distill as distill_model
from mplib.speedups.distill import distillation_loss, half_depth_student
from mplib.speedups.freezing import (BackwardCounter, FreezeSchedule, freeze, frozen_blocks, frozen_costs, replan,
                                     replan_phases, unfreeze)
from mplib.speedups.harness import Harness, Result, plot, table
from mplib.speedups.lowrank import LowRankLinear, factorize, factorize_model, rank_for_energy
from mplib.speedups.memory import OffloadEstimate, estimate
from mplib.speedups.offload import OffloadActivations, OffloadedOptimizer, checkpoint, uncheckpoint
from mplib.speedups.precision import (Int4WeightLinear, Int8WeightLinear, MixedPrecision, int8_engines, model_bytes,
                                      quantize_dynamic, quantize_weights)
from mplib.speedups.pruning import PrunedSelfAttention, head_scores, magnitude_prune, prune_heads

__all__ = ["BackwardCounter", "FreezeSchedule", "Harness", "Int4WeightLinear", "Int8WeightLinear", "LowRankLinear",
           "MixedPrecision", "OffloadActivations", "OffloadEstimate", "OffloadedOptimizer", "PrunedSelfAttention",
           "Result", "checkpoint", "distill_model", "distillation_loss", "estimate", "factorize", "factorize_model",
           "freeze", "frozen_blocks", "frozen_costs", "half_depth_student", "head_scores", "int8_engines",
           "magnitude_prune", "model_bytes", "plot", "prune_heads", "quantize_dynamic", "quantize_weights",
           "rank_for_energy", "replan", "replan_phases", "table", "uncheckpoint", "unfreeze"]
