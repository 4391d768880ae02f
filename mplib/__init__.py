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

`mplib.split` and `mplib.simulate` are the modules, and calling one calls its function of the
same name: `import mplib.simulate as sim` and `from mplib.split import SplitModel` work as usual.
"""

import types

from mplib import data, env, layers, schedule, split, simulate, timeline, transfer  # noqa: F401
from mplib.pipeline import Pipeline
from mplib.split import SplitModel


class _CallableModule(types.ModuleType):
    """A module that, called, calls its function of the same name (`mplib.split(...)` is `split.split(...)`)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


for _module in (split, simulate):
    _module.__class__ = _CallableModule



def __getattr__(name: str) -> types.ModuleType:
    """`mplib.plot`, `mplib.partition`, ... after a bare `import mplib`: a submodule loads on first use."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'mplib' has no attribute {name!r}") from None


__version__ = "0.1.0"

__all__ = ["Pipeline", "SplitModel", "data", "env", "layers", "schedule", "simulate", "split",
           "timeline", "transfer"]
