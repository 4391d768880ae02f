import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import mplib.plot


def test_layer_bytes_draws_one_bar_per_layer_and_series_in_the_unit():
    ax = mplib.plot.layer_bytes(["embed", "lstm 0"], {"parameters": [1024, 2048], "activations": [0, 4096]})
    heights = sorted(patch.get_height() for patch in ax.patches)
    assert heights == [0.0, 1.0, 2.0, 4.0]  # KiB
    plt.close("all")


def test_layer_bytes_rejects_a_series_of_the_wrong_length():
    with pytest.raises(ValueError, match="series 'activations' has 1 values for 2 layers"):
        mplib.plot.layer_bytes(["a", "b"], {"activations": [1]})


def test_embeddings_scatters_the_first_two_principal_components_by_label():
    points = torch.zeros(6, 4)
    points[:3, 0], points[3:, 0] = 1.0, -1.0  # two clouds along one axis
    ax = mplib.plot.embeddings(points, ["a"] * 3 + ["b"] * 3)
    a, b = (torch.as_tensor(c.get_offsets().data) for c in ax.collections)
    assert a.shape == b.shape == (3, 2)
    torch.testing.assert_close(a[:, 0].abs(), torch.ones(3, dtype=a.dtype))  # PC 1 is the axis that separates them
    assert torch.sign(a[0, 0]) != torch.sign(b[0, 0])
    plt.close("all")


def test_embeddings_draws_identical_vectors_on_one_spot():
    ax = mplib.plot.embeddings(torch.full((4, 3), 2.5), ["x", "x", "y", "y"])
    assert all(torch.as_tensor(c.get_offsets().data).abs().max() == 0 for c in ax.collections)
    with pytest.raises(ValueError, match="one label per row"):
        mplib.plot.embeddings(torch.zeros(4, 3), ["x"])
    plt.close("all")
