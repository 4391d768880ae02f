"""Scatter/gather of nested batches: round trips, uneven chunks, errors that state the rule."""

from dataclasses import dataclass

import pytest
import torch

from mplib.microbatch import batch_size, chunk_sizes, gather, scatter


def test_chunk_sizes_are_even_with_the_smaller_ones_last():
    assert chunk_sizes(8, 4) == [2, 2, 2, 2]
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(5, 5) == [1] * 5
    assert chunk_sizes(7, 1) == [7]


def test_scatter_then_gather_is_the_identity_on_a_nested_batch():
    x, y, z = torch.randn(10, 3), torch.arange(10), torch.randn(10, 2, 2)
    batch = (x, {"y": y, "none": None, "flag": 3}, [z])
    mbs = scatter(batch, 4)
    assert [m[0].shape[0] for m in mbs] == [3, 3, 2, 2]
    assert all(m[1]["none"] is None and m[1]["flag"] == 3 for m in mbs)
    back = gather(mbs)
    torch.testing.assert_close(back[0], x)
    torch.testing.assert_close(back[1]["y"], y)
    torch.testing.assert_close(back[2][0], z)


def test_scatter_makes_views_not_copies():
    x = torch.randn(6, 2)
    first = scatter(x, 3)[0]
    assert first.data_ptr() == x.data_ptr()


def test_scatter_keeps_dataclasses_and_zero_dim_tensors():
    @dataclass
    class Batch:
        ids: torch.Tensor
        scale: torch.Tensor

    mbs = scatter(Batch(torch.arange(6), torch.tensor(2.0)), 2)
    assert isinstance(mbs[1], Batch) and mbs[1].ids.tolist() == [3, 4, 5]
    assert mbs[1].scale.item() == 2.0


def test_gather_stacks_scalar_losses():
    assert gather([torch.tensor(1.0), torch.tensor(2.0)]).tolist() == [1.0, 2.0]


def test_scatter_rejects_a_batch_smaller_than_chunks():
    with pytest.raises(ValueError, match="batch of 3 examples cannot make 4 micro-batches"):
        scatter(torch.zeros(3, 2), 4)


def test_scatter_rejects_mismatched_batch_sizes_in_one_structure():
    with pytest.raises(ValueError, match=r"share their dim-0 size.*\(8, 2\).*\(6, 2\)"):
        scatter((torch.zeros(8, 2), torch.zeros(6, 2)), 2)


def test_scatter_rejects_a_batch_without_tensors_and_bad_chunks():
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        batch_size({"a": None})
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        scatter(torch.zeros(4), 0)


def test_gather_rejects_outputs_of_different_structure():
    with pytest.raises(ValueError, match="differ in structure"):
        gather([(torch.zeros(2),), (torch.zeros(2), torch.zeros(2))])
    with pytest.raises(ValueError, match="at least one"):
        gather([])
