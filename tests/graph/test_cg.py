import pytest
import torch

from vlweak.graph import build_zlap_graph, conjugate_gradient, propagation_operator
from vlweak.graph.propagation import class_solutions


def test_multi_rhs_cg_matches_dense_solve_on_a_small_graph(clustered_data):
    images, text, _ = clustered_data(n=120, d=16, c=5)
    graph = build_zlap_graph(images.double(), text.double(), k=5, gamma=5.0)
    alpha = 0.3
    dense = torch.eye(graph.num_nodes, dtype=torch.float64) - alpha * graph.adjacency.to_dense()
    y = torch.zeros(graph.num_nodes, 5, dtype=torch.float64)
    y[torch.arange(5), torch.arange(5)] = 1
    expected = torch.linalg.solve(dense, y)
    result = class_solutions(graph, alpha, tol=1e-10, maxiter=200)
    assert result.converged.all()
    torch.testing.assert_close(result.x, expected, atol=1e-4, rtol=0)


def test_float32_default_tolerance_agrees_to_1e4(clustered_data):
    images, text, _ = clustered_data(n=200, d=16, c=4)
    graph = build_zlap_graph(images, text)
    dense = torch.eye(graph.num_nodes) - 0.3 * graph.adjacency.to_dense()
    y = torch.zeros(graph.num_nodes, 4)
    y[torch.arange(4), torch.arange(4)] = 1
    x, expected = class_solutions(graph, 0.3).x, torch.linalg.solve(dense, y)
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=0)
    # the image rows are small (about 1e-3 here): compare them relative to their size, and their argmax
    img, img_expected = x[4:], expected[4:]
    assert ((img - img_expected).norm() / img_expected.norm()).item() < 1e-4
    assert torch.equal(img.argmax(1), img_expected.argmax(1))


def test_columns_are_independent_solves():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 4, generator=g, dtype=torch.float64)
    b[:, 2] = 0  # a zero column converges at once to zero
    together = conjugate_gradient(lambda x: a @ x, b, tol=1e-8, maxiter=100)
    for j in range(4):
        alone = conjugate_gradient(lambda x: a @ x, b[:, j], tol=1e-8, maxiter=100)
        torch.testing.assert_close(together.x[:, j], alone.x, atol=1e-10, rtol=0)
    assert torch.equal(together.x[:, 2], torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(together.x, torch.linalg.solve(a, b), atol=1e-6, rtol=0)


def test_bad_alpha_raises(clustered_data):
    images, text, _ = clustered_data(n=20, d=8, c=2)
    graph = build_zlap_graph(images, text)
    with pytest.raises(ValueError):
        propagation_operator(graph, 1.0)
