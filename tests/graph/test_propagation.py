import warnings

import pytest
import torch

from vlweak.graph import ZLaPPropagator


def _acc(scores, labels):
    return (scores.argmax(1) == labels).float().mean().item()


def test_transductive_beats_nearest_text_zero_shot(clustered_data):
    for seed in range(3):
        images, text, labels = clustered_data(n=1000, d=32, c=8, spread=1.0, text_noise=1.5, seed=seed)
        zero_shot = _acc(images @ text.T, labels)
        zlap = _acc(ZLaPPropagator().fit(images, text).transductive(), labels)
        assert zlap > zero_shot + 0.04, (seed, zero_shot, zlap)


def test_inductive_modes_agree_with_transductive_on_held_out_points(clustered_data):
    images, text, labels = clustered_data(n=1200, d=32, c=8, spread=1.0, text_noise=1.5, seed=0)
    base, held = images[:1000], images[1000:]
    prop = ZLaPPropagator().fit(base, text)
    dual, sparse = prop.inductive(held), prop.sparse_inductive(held)
    full = ZLaPPropagator().fit(images, text).transductive()[1000:]
    agree = lambda a, b: (a.argmax(1) == b.argmax(1)).float().mean().item()  # noqa: E731
    assert agree(dual, full) >= 0.9
    assert agree(sparse, full) >= 0.9
    assert agree(sparse, dual) >= 0.9
    zero_shot = _acc(held @ text.T, labels[1000:])
    assert _acc(dual, labels[1000:]) > zero_shot
    assert _acc(sparse, labels[1000:]) > zero_shot


def test_dual_solution_equals_product_with_full_solution(clustered_data):
    # (I - alpha W̄) is symmetric, so the dual solve for y_q gives y_q · X, X the full solution.
    images, text, _ = clustered_data(n=300, d=16, c=5)
    prop = ZLaPPropagator(tol=1e-9, maxiter=200).fit(images[:250].double(), text.double())
    queries = images[250:].double()
    nodes, weights = prop.edges(queries)
    expected = (prop.solution()[nodes] * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(prop.inductive(queries), expected, atol=1e-6, rtol=0)
    # with every entry kept, the sparse variant is that same product
    prop.sparse_topk = 5
    torch.testing.assert_close(prop.sparse_inductive(queries), expected, atol=1e-6, rtol=0)


def test_batched_dual_matches_unbatched(clustered_data):
    images, text, _ = clustered_data(n=300, d=16, c=5)
    prop = ZLaPPropagator().fit(images[:250], text)
    one = prop.inductive(images[250:])
    prop.batch_size = 7
    torch.testing.assert_close(prop.inductive(images[250:]), one, atol=1e-6, rtol=0)


def test_unfitted_propagator_raises():
    import pytest

    with pytest.raises(RuntimeError):
        ZLaPPropagator().transductive()


def test_a_graph_of_no_more_images_than_k_warns():
    from torch.nn.functional import normalize

    images = normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    with pytest.warns(UserWarning, match=r"ZLaP k=5 but the graph has 5 images: each links to all 4 others"):
        ZLaPPropagator(k=5).fit(images, images[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZLaPPropagator(k=4).fit(images, images[:2])


def test_approximate_knn_engine_keeps_the_predictions():
    g = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(10, 32, generator=g), dim=1)
    labels = torch.randint(10, (3000,), generator=g)
    images = torch.nn.functional.normalize(centres[labels] + 0.2 * torch.randn(3000, 32, generator=g), dim=1)
    text = torch.nn.functional.normalize(centres + 0.3 * torch.randn(10, 32, generator=g), dim=1)
    exact = ZLaPPropagator(knn_engine="faiss").fit(images, text).transductive().argmax(1)
    approx = ZLaPPropagator(knn_engine="faiss-ivf").fit(images, text).transductive().argmax(1)
    assert (exact == approx).float().mean().item() >= 0.99


def test_sparse_topk_must_be_positive():
    with pytest.raises(ValueError, match="sparse_topk"):
        ZLaPPropagator(sparse_topk=0)


def test_a_solve_stopped_by_maxiter_warns(clustered_data):
    images, text, _ = clustered_data(n=200, d=16, c=4)
    prop = ZLaPPropagator(alpha=0.99, maxiter=2).fit(images, text)
    with pytest.warns(RuntimeWarning, match="did not reach the CG tolerance"):
        prop.transductive()
    with pytest.warns(RuntimeWarning, match="dual inductive"):
        prop.inductive(images[:3])


def test_bfloat16_features_propagate_like_float32(clustered_data):
    images, text, labels = clustered_data(n=300, d=16, c=4)
    full = ZLaPPropagator().fit(images, text).transductive()
    half = ZLaPPropagator().fit(images.bfloat16(), text.bfloat16()).transductive()
    assert half.dtype == torch.float32
    assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.95


def test_degree_query_norm_joins_a_new_image_like_the_graphs_own_edges(clustered_data):
    from vlweak.graph import query_edges

    images, text, _ = clustered_data(n=300, d=16, c=5)
    base, queries = images[:250].double(), images[250:].double()
    prop = ZLaPPropagator(tol=1e-9, maxiter=200, query_norm="degree").fit(base, text.double())
    # the graph's degrees are those of W + Wᵀ, the matrix its adjacency normalises
    nodes, weights = query_edges(base, None, text.double(), prop.k, prop.gamma)
    c, n = text.shape[0], base.shape[0]
    w = torch.zeros(c + n, c + n, dtype=torch.float64)
    w[(torch.arange(n) + c).unsqueeze(1).expand_as(nodes), nodes] = weights
    w = w + w.T
    degree = w.sum(1)
    torch.testing.assert_close(prop.graph.degree, degree)
    torch.testing.assert_close(prop.graph.adjacency.to_dense(), w / degree.sqrt()[:, None] / degree.sqrt()[None, :])
    # a query's edge to node j is scaled by 1/sqrt(d_j): its score is the propagation to it as a node
    q_nodes, q_weights = query_edges(queries, base, text.double(), prop.k, prop.gamma)
    expected = (prop.solution()[q_nodes] * (q_weights / degree[q_nodes].sqrt()).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(prop.inductive(queries), expected, atol=1e-6, rtol=0)
    prop.sparse_topk = 5
    torch.testing.assert_close(prop.sparse_inductive(queries), expected, atol=1e-6, rtol=0)
    # the transductive scores do not depend on it
    plain = ZLaPPropagator(tol=1e-9, maxiter=200).fit(base, text.double())
    torch.testing.assert_close(prop.transductive(), plain.transductive())
    with pytest.raises(ValueError, match="query_norm must be one of .*'sqrt'"):
        ZLaPPropagator(query_norm="sqrt")
