"""The top-level names readers use: `mplib.split` and `mplib.simulate` are modules that can be called."""

import importlib
import types

import mplib
from mplib.models.gpt import GPT, GPT_TINY


def test_importing_a_submodule_gives_the_module_not_the_function_of_the_same_name():
    for name in ("split", "simulate"):
        mod = importlib.import_module(f"mplib.{name}")
        assert isinstance(mod, types.ModuleType) and getattr(mplib, name) is mod
        exec(f"import mplib.{name} as alias", ns := {})
        assert ns["alias"] is mod  # `import a.b as c` reads the attribute, so a function there would win


def test_calling_mplib_split_and_mplib_simulate_calls_their_functions():
    sm = mplib.split(GPT(GPT_TINY), ["cpu", "cpu"])
    assert isinstance(sm, mplib.split.SplitModel) and sm.balance == [2, 2]
    tl = mplib.simulate(mplib.schedule.build("gpipe", 2, 2), [1, 1], [2, 2])
    assert isinstance(tl, mplib.timeline.Timeline) and tl.duration == 9
