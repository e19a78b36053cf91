import pytest
import torch
from torch.nn.functional import normalize

from vlweak.graph import knn, self_knn


def _brute(q, b, k, exclude_self):
    s = q @ b.T
    if exclude_self:
        s.fill_diagonal_(float("-inf"))
    return s.topk(k, dim=1)


@pytest.mark.parametrize("engine", ["faiss", "torch", "torch-bf16"])
def test_cross_search_matches_brute_force(engine):
    g = torch.Generator().manual_seed(0)
    base = normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = normalize(torch.randn(70, 16, generator=g), dim=1)
    sims, idx = knn(queries, base, 7, engine=engine, block_size=32)
    ref_s, ref_i = _brute(queries, base, 7, False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(sims, ref_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["faiss", "torch", "torch-bf16"])
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
    for engine in ("faiss", "torch", "torch-bf16"):
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


def _clustered(n: int, d: int, clusters: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = normalize(torch.randn(clusters, d, generator=g), dim=1)
    return normalize(centres[torch.randint(clusters, (n,), generator=g)] + 0.15 * torch.randn(n, d, generator=g), dim=1)


def test_ivf_engine_is_close_to_exact_and_excludes_self():
    x = _clustered(4000, 32, 20, seed=3)
    sims, idx = self_knn(x, 5, engine="faiss-ivf")
    ref_s, ref_i = _brute(x, x, 5, True)
    assert sims.shape == idx.shape == (4000, 5)
    assert not (idx == torch.arange(4000).unsqueeze(1)).any()
    recall = (idx.unsqueeze(2) == ref_i.unsqueeze(1)).any(2).float().mean().item()
    assert recall > 0.9, recall
    # what it returns are true similarities, sorted
    torch.testing.assert_close(sims, (x.unsqueeze(1) * x[idx]).sum(-1), atol=1e-5, rtol=0)
    assert (sims[:, :-1] >= sims[:, 1:] - 1e-6).all()


def test_ivf_engine_falls_back_to_exact_for_rows_it_cannot_fill():
    # 100 points: one list of 2 (100 // 39); ask for more neighbours than one probed list can hold
    x = _clustered(100, 8, 2, seed=4)
    sims, idx = knn(x, x, 90, engine="faiss-ivf")
    ref_s, ref_i = _brute(x, x, 90, False)
    assert (idx >= 0).all()
    torch.testing.assert_close(sims, ref_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ["faiss", "torch", "torch-bf16", "faiss-ivf"])
@pytest.mark.parametrize("self_search", [True, False])
def test_a_search_with_a_progress_bar_finds_the_same_neighbours(engine, self_search, monkeypatch, capsys):
    import importlib

    knn_module = importlib.import_module("vlweak.graph.knn")  # the package exports the function by that name
    # small thresholds, so that this small search is "large" and faiss searches in several chunks
    monkeypatch.setattr(knn_module, "PROGRESS_MIN_ENTRIES", 1000)
    monkeypatch.setattr(knn_module, "PROGRESS_CHUNK", 64)
    g = torch.Generator().manual_seed(3)
    x = normalize(torch.randn(2000, 16, generator=g), dim=1)
    base = None if self_search else normalize(torch.randn(500, 16, generator=g), dim=1)
    quiet = knn(x, base, 5, engine=engine, block_size=128)
    capsys.readouterr()
    shown = knn(x, base, 5, engine=engine, block_size=128, progress=True)
    assert "kNN graph" in capsys.readouterr().err
    assert torch.equal(shown[1], quiet[1]) and torch.equal(shown[0], quiet[0])
    monkeypatch.setattr(knn_module, "PROGRESS_MIN_ENTRIES", 10**12)  # a small search shows no bar
    knn(x, base, 5, engine=engine, block_size=128, progress=True)
    assert "kNN graph" not in capsys.readouterr().err


def test_bf16_error_bound_holds_for_bf16_products():
    from vlweak.graph.knn import bf16_error_bound

    g = torch.Generator().manual_seed(4)
    for d in (16, 512):
        x = normalize(torch.randn(500, d, generator=g), dim=1)
        y = torch.cat([x[:50] + 0.01 * torch.randn(50, d, generator=g), torch.randn(450, d, generator=g)])
        y = normalize(y, dim=1)  # near-duplicates (similarities near 1) and unrelated points
        stored = (x.bfloat16() @ y.bfloat16().T).double()
        err = (stored - x.double() @ y.double().T).abs()
        assert 0 < err.max() <= bf16_error_bound(d)
        assert (err <= bf16_error_bound(d, 1.0, stored)).all()  # the bound for each stored value
        assert (bf16_error_bound(d, 1.0, stored)[stored.abs() < 0.5] < bf16_error_bound(d)).all()  # tighter when small


@pytest.mark.parametrize("self_search", [True, False])
def test_bf16_screening_is_exact_where_bfloat16_cannot_rank(self_search):
    """Points whose similarities differ by less than bfloat16 resolves: the screened candidates
    alone rank them wrongly, the verification sends those rows to the exact search."""
    from vlweak.graph.knn import _torch_cross

    g = torch.Generator().manual_seed(5)
    centre = normalize(torch.randn(1, 64, generator=g), dim=1)
    x = normalize(centre + 2e-2 * torch.randn(3000, 64, generator=g), dim=1)  # similarities ~0.987 +- 1e-3
    base = None if self_search else x[:1000]
    sims, idx = knn(x[:300] if base is not None else x, base, 5, engine="torch-bf16", block_size=256)
    q = x[:300] if base is not None else x
    exact = q.double() @ (x if base is None else base).double().T
    if base is None:
        exact.fill_diagonal_(float("-inf"))
    ref_s, ref_i = exact.topk(5, dim=1)
    # the exact answer up to fp32 ties: the similarities, and each neighbour's true similarity
    torch.testing.assert_close(sims.double(), ref_s, atol=1e-6, rtol=0)
    assert (exact.gather(1, idx) >= ref_s[:, -1:] - 1e-6).all()
    assert (idx == ref_i).all(dim=1).float().mean() > 0.99
    b16 = q.bfloat16()
    rough = _torch_cross(b16, b16 if base is None else base.bfloat16(), 6 if base is None else 5, 256)[1]
    if base is None:
        rough = rough[:, 1:]  # what bfloat16 alone would answer (self first among equals, or not)
    assert (rough != ref_i).any(dim=1).float().mean() > 0.5


def test_bf16_screening_re_ranks_every_candidate_the_inputs_rounding_could_promote():
    """Neighbours almost orthogonal to the query: their inner products cancel, so rounding the inputs
    moves them by many times their size, and bfloat16 misranks them. Every candidate within the
    inputs' error of the k-th must be re-ranked; the points far below them must not trigger the
    fallback search, so only the re-ranking can get these rows right."""
    g = torch.Generator().manual_seed(7)
    misranked = 0
    for trial in range(5):
        d = 64
        q = normalize(torch.randn(1, d, generator=g), dim=1)
        r = torch.randn(2020, d, generator=g)
        r = normalize(r - (r @ q.T) * q, dim=1)  # orthogonal to the query
        near = normalize(r[:20] + 2e-3 * torch.rand(20, 1, generator=g) * q, dim=1)  # similarity 0 .. 0.002
        far = normalize(r[20:] - 0.1 * q, dim=1)  # similarity about -0.1
        base = torch.cat([far[:1000], near, far[1000:]])
        sims, idx = knn(q, base, 5, engine="torch-bf16")
        exact = (q.double() @ base.double().T).flatten().topk(5)
        assert idx.flatten().tolist() == exact.indices.tolist(), trial
        torch.testing.assert_close(sims.flatten().double(), exact.values, atol=1e-7, rtol=0)
        rough = (q.bfloat16() @ base.bfloat16().T).float().flatten()
        misranked += set(rough.topk(5).indices.tolist()) != set(idx.flatten().tolist())
    assert misranked >= 3  # bfloat16 alone picks other neighbours


def test_auto_picks_bf16_screening_on_a_cpu_where_it_is_fast(monkeypatch):
    import importlib

    knn_module = importlib.import_module("vlweak.graph.knn")
    picked = []
    original = knn_module._bf16_search
    monkeypatch.setattr(knn_module, "_bf16_search", lambda *a, **kw: picked.append(1) or original(*a, **kw))
    monkeypatch.setattr(knn_module, "BF16_MIN_ENTRIES", 1000)
    x = normalize(torch.randn(200, 8), dim=1)
    monkeypatch.setitem(knn_module._BF16_PROBE, "cpu", 1.2)  # bfloat16 no faster than fp32: faiss
    slow = knn(x, None, 4)
    assert picked == []
    monkeypatch.setitem(knn_module._BF16_PROBE, "cpu", 6.0)
    fast = knn(x, None, 4)
    assert picked == [1] and torch.equal(fast[1], slow[1])
    monkeypatch.setattr(knn_module, "BF16_MIN_ENTRIES", 10**9)  # a small search keeps faiss
    knn(x, None, 4)
    assert picked == [1]
