"""mplib on several processes and machines: torch.distributed.pipelining stages from an mplib plan, DP x PP x TP.

    launch.py       launch(fn, N): N local gloo processes, bounded; init(): join a torchrun job
    mesh.py         the pp x dp x tp grid of ranks and its process groups (a torch DeviceMesh too)
    checks.py       every process must run the same plan on the same model: a fingerprint, compared
    stages.py       this rank's PipelineStages, cut from the model's blocks without the tracer
    schedules.py    mplib's schedule names -> torch's classes
    weighting.py    each micro-batch's loss weighted by its share of the global batch's items, as mplib.Pipeline
    pipeline.py     DistributedPipeline: stages + schedule + tied and data-parallel gradients + timelines
    clock.py        one clock for every rank's timeline (exact on one machine, a round trip's error across)
    checkpoint.py   torch.distributed.checkpoint under the unsplit model's keys: any layout in, any out

Example (several processes):
    # each rank, under `torchrun --nproc-per-node 2` or `launch(fn, 2)`; x, y: a batch (8, 16) of token ids
    pipe = mplib.distributed.DistributedPipeline(GPT(GPT_TINY), [2, 2], loss_fn=lm_loss, chunks=4)
    loss = pipe.step(x, y)              # equals the unsplit model's loss; so do the gradients
"""

from mplib.distributed.checkpoint import load, load_model, save, state_dict
from mplib.distributed.launch import LaunchError, init, launch
from mplib.distributed.mesh import Mesh, mesh
from mplib.distributed.pipeline import DistributedPipeline
from mplib.distributed.schedules import SCHEDULES
from mplib.distributed.stages import StageError, StageModule, Structure, placement, stages

__all__ = ["DistributedPipeline", "LaunchError", "Mesh", "SCHEDULES", "StageError", "StageModule", "Structure",
           "init", "launch", "load", "load_model", "mesh", "placement", "save", "stages", "state_dict"]
