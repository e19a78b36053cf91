import pytest
import torch

from vlweak.graph import build_zlap_graph


def _dense_reference(images, text, k, gamma):
    """The ZLaP graph by its definition, with dense matrices."""
    n, c = images.shape[0], text.shape[0]
    w = torch.zeros(n + c, n + c, dtype=images.dtype)
    s_ii = images @ images.T
    s_ii.fill_diagonal_(float("-inf"))
    v, i = s_ii.topk(k, dim=1)
    w[torch.arange(n).unsqueeze(1) + c, i + c] = v.clamp_min(0)
    v, i = (images @ text.T).topk(min(k, c), dim=1)
    w[torch.arange(n).unsqueeze(1) + c, i] = v.clamp_min(0) ** gamma
    w = w + w.T
    d = w.sum(1)
    d[d == 0] = 1
    return w / d.sqrt().unsqueeze(0) / d.sqrt().unsqueeze(1)


@pytest.mark.parametrize("k,gamma", [(5, 5.0), (3, 1.0), (10, 3.0)])
def test_graph_matches_definition_and_is_symmetric_normalised(clustered_data, k, gamma):
    images, text, _ = clustered_data(n=90, d=16, c=4)
    images, text = images.double(), text.double()
    graph = build_zlap_graph(images, text, k=k, gamma=gamma)
    dense = graph.adjacency.to_dense()
    assert graph.adjacency.layout == torch.sparse_csr
    assert dense.shape == (94, 94)
    torch.testing.assert_close(dense, dense.T)
    torch.testing.assert_close(dense, _dense_reference(images, text, k, gamma))
    assert (dense >= 0).all() and (dense.diagonal() == 0).all()
    # symmetric normalisation: the spectrum of W̄ lies in [-1, 1] and reaches 1
    eig = torch.linalg.eigvalsh(dense)
    assert eig.max() == pytest.approx(1.0, abs=1e-9) and eig.min() >= -1 - 1e-9


def test_storage_is_linear_in_n(clustered_data):
    images, text, _ = clustered_data(n=400, d=16, c=6)
    graph = build_zlap_graph(images, text, k=5)
    assert graph.adjacency.values().numel() <= 2 * 400 * (5 + 5)


def test_negative_similarities_are_clipped():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    dense = build_zlap_graph(images, text, k=2, gamma=2.0).adjacency.to_dense()
    assert (dense >= 0).all()
    # image 0 and image 2 are opposite: no edge between them, nor from image 0 to text 1
    assert dense[2, 4] == 0 and dense[2, 1] == 0


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError):
        build_zlap_graph(torch.randn(5, 3), torch.randn(2, 4))
    with pytest.raises(ValueError):
        build_zlap_graph(torch.randn(1, 3), torch.randn(2, 3))


def test_empty_text_and_mixed_dtypes_raise_naming_the_problem():
    with pytest.raises(ValueError, match="at least one class"):
        build_zlap_graph(torch.randn(5, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="float64"):
        build_zlap_graph(torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_build_the_float32_graph(clustered_data, dtype):
    images, text, _ = clustered_data(n=100, d=16, c=4)
    images, text = images.to(dtype), text.to(dtype)
    half = build_zlap_graph(images, text, k=5, gamma=5.0)
    full = build_zlap_graph(images.float(), text.float(), k=5, gamma=5.0)
    assert half.adjacency.dtype == torch.float32
    torch.testing.assert_close(half.adjacency.to_dense(), full.adjacency.to_dense())
