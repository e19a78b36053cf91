import pytest
import torch
from torch.nn.functional import normalize

from vlweak.graph import knn, self_knn


def _brute(q, b, k, exclude_self):
    s = q @ b.T
    if exclude_self:
        s.fill_diagonal_(float("-inf"))
    return s.topk(k, dim=1)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_cross_search_matches_brute_force(engine):
    g = torch.Generator().manual_seed(0)
    base = normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = normalize(torch.randn(70, 16, generator=g), dim=1)
    sims, idx = knn(queries, base, 7, engine=engine, block_size=32)
    ref_s, ref_i = _brute(queries, base, 7, False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(sims, ref_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
@pytest.mark.parametrize("block", [32, 64, 1000])
def test_self_search_matches_brute_force_and_excludes_self(engine, block):
    g = torch.Generator().manual_seed(1)
    x = normalize(torch.randn(257, 12, generator=g), dim=1)
    sims, idx = self_knn(x, 5, engine=engine, block_size=block)
    ref_s, ref_i = _brute(x, x, 5, True)
    assert not (idx == torch.arange(257).unsqueeze(1)).any()
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(sims, ref_s, atol=1e-5, rtol=0)


def test_self_excluded_by_index_even_with_duplicates():
    g = torch.Generator().manual_seed(2)
    x = normalize(torch.randn(50, 8, generator=g), dim=1)
    x = torch.cat([x, x])  # every point has an exact twin
    for engine in ("faiss", "torch"):
        sims, idx = self_knn(x, 3, engine=engine, block_size=16)
        rows = torch.arange(100)
        assert not (idx == rows.unsqueeze(1)).any()
        assert (idx[:, 0] == (rows + 50) % 100).all()
        torch.testing.assert_close(sims[:, 0], torch.ones(100), atol=1e-5, rtol=0)


def test_k_is_clipped_and_bad_inputs_raise():
    x = normalize(torch.randn(4, 3), dim=1)
    sims, idx = self_knn(x, 10)
    assert sims.shape == (4, 3)
    assert knn(x, x[:2], 5)[0].shape == (4, 2)
    with pytest.raises(ValueError):
        knn(x, torch.randn(4, 5), 2)
    with pytest.raises(ValueError):
        self_knn(x[:1], 1)
    with pytest.raises(ValueError):
        knn(x, x, 0)
    with pytest.raises(ValueError):
        knn(x, x, 2, engine="annoy")
