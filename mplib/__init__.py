"""mplib: the splitting, scheduling and transfer logic of the model-parallelism course.

One module per concept (see the README's glossary): `env` (devices), `data` (corpora and
tokenizers), `models` (RNN, ELMo, BERT, GPT written to be split), `layers` (a model's ordered
blocks), `transfer` (moving nested activations), `split` (blocks on devices), `memory` and
`hardware` (what fits where), `microbatch`, `schedule`, `pipeline` and `simulate` (pipelining),
`profile` and `partition` (balancing), `timeline` and `plot` (seeing what happened).

The three entry points most readers want are importable from the top:

    import mplib
    model = mplib.split(model, mplib.env.get_devices(2))        # a SplitModel
    pipe = mplib.Pipeline(model, chunks=4, schedule="1f1b")      # pipelined training
    timeline = mplib.simulate(mplib.schedule.build("1f1b", 4, 8), [1] * 4, [2] * 4)

`mplib.split` and `mplib.simulate` are the functions; their modules' other names import as
`from mplib.split import SplitModel` and `from mplib.simulate import action_times`.
"""

from mplib import data, env, layers, schedule, timeline, transfer  # noqa: F401  (submodules as attributes)
from mplib.pipeline import Pipeline
from mplib.simulate import simulate
from mplib.split import SplitModel, split

__version__ = "0.1.0"

__all__ = ["Pipeline", "SplitModel", "data", "env", "layers", "schedule", "simulate", "split",
           "timeline", "transfer"]
