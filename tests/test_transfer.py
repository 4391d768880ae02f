"""mplib.transfer.to_device: nested structures, pass-through leaves, errors, CUDA streams."""

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from mplib.transfer import map_tensors, to_device

Pair = namedtuple("Pair", "hidden mask")


@dataclass
class Activations:
    hidden: torch.Tensor
    layer: int
    note: str = ""


def test_every_tensor_in_a_nested_structure_moves_and_containers_keep_their_types():
    x = torch.randn(2, 3)
    obj = {"pair": Pair(x, None), "list": [x, (x, 3)], "acts": Activations(x, 1, "a")}
    out = to_device(obj, "meta")  # meta is a real second device on any machine
    assert out["pair"].hidden.device.type == "meta" and out["pair"].mask is None
    assert isinstance(out["pair"], Pair) and isinstance(out["list"][1], tuple)
    assert out["list"][0].device.type == "meta" and out["list"][1] == (out["list"][1][0], 3)
    assert isinstance(out["acts"], Activations) and out["acts"].hidden.device.type == "meta"
    assert (out["acts"].layer, out["acts"].note) == (1, "a")
    assert x.device.type == "cpu"  # the source is untouched


def test_model_output_stays_a_model_output_with_the_same_keys():
    logits = torch.randn(2, 4, 5)
    out = to_device(CausalLMOutput(logits=logits), "meta")
    assert isinstance(out, CausalLMOutput)
    assert list(out.keys()) == ["logits"] and out.logits.device.type == "meta"
    assert out.loss is None


def test_none_bools_ints_floats_and_strings_pass_through_unchanged():
    leaves = (None, True, 3, 2.5, "mask")
    assert to_device(leaves, "meta") == leaves


def test_a_tensor_already_on_the_device_is_returned_as_is():
    x = torch.randn(3, requires_grad=True)
    assert to_device(x, "cpu") is x
    assert to_device((x,), torch.device("cpu"))[0] is x


def test_an_unknown_leaf_is_a_type_error_naming_its_type_and_path():
    with pytest.raises(TypeError, match=r"cannot move a object at obj\['a'\]\[1\]"):
        to_device({"a": [torch.zeros(1), object()]}, "cpu")


def test_map_tensors_applies_a_function_to_every_tensor_only():
    out = map_tensors({"x": torch.ones(2), "n": 4}, lambda t: t * 2)
    torch.testing.assert_close(out["x"], torch.full((2,), 2.0))
    assert out["n"] == 4


@pytest.mark.cuda
@pytest.mark.parametrize("pinned", [False, True])
def test_non_blocking_copy_to_gpu_equals_a_blocking_copy(pinned):
    x = torch.randn(4096, 4096)  # 64 MiB: a compute stream that did not wait would read it half-copied
    x = x.pin_memory() if pinned else x
    y = to_device(x, "cuda:0", non_blocking=True)
    y = y * 2  # read on the compute stream right away: it must wait for the copy
    torch.testing.assert_close(y.cpu(), x * 2)


@pytest.mark.cuda
def test_gradient_flows_back_to_the_source_device_through_a_non_blocking_copy():
    x = torch.randn(64, 64, requires_grad=True)
    y = to_device({"h": x}, "cuda:0", non_blocking=True)["h"]
    (y * 3).sum().backward()
    assert x.grad.device.type == "cpu"
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


@pytest.mark.cuda
def test_gpu_to_cpu_copy_is_readable_at_once():
    x = torch.randn(128, device="cuda:0")
    torch.testing.assert_close(to_device(x, "cpu", non_blocking=True), x.cpu())


@pytest.mark.cuda
def test_a_non_blocking_copy_runs_on_the_copy_stream_and_the_compute_stream_waits_for_it():
    from mplib.transfer import copy_stream

    x = torch.randn(2048, 2048).pin_memory()
    side = copy_stream("cuda:0")
    assert side != torch.cuda.current_stream(0)
    y = to_device(x, "cuda:0", non_blocking=True)
    z = y.sum()  # queued on the compute stream, after the event the copy stream records
    torch.testing.assert_close(z.cpu(), x.sum(), rtol=1e-5, atol=1e-2)  # fp32 sums of 4M numbers, orders differ
