"""k-nearest neighbours by inner product on L2-normalised features.

Two exact engines, one answer (up to ties):

* ``"faiss"``: an exact ``faiss.IndexFlatIP`` (on the CPU: accelerator tensors are searched as a host copy);
* ``"torch"``: blockwise ``matmul`` + ``topk`` on whatever device the tensors are on. When the
  queries *are* the base set (a self-search), the Gram matrix is symmetric, so only the tiles on and
  above the diagonal are multiplied and each tile feeds the top-k of its rows and of its columns:
  half the arithmetic of a plain search.

And a third exact engine, for CPUs with fast bfloat16 arithmetic (AVX512-BF16, AMX):

* ``"torch-bf16"``: screens candidates in bfloat16 (the top ``max(32, 2k)`` of each query, a plain
  blockwise search), re-ranks them with fp32 inner products (one sampled sparse product over the
  query-candidate pairs, no gathered copies) and *verifies* each row. Rounding to
  bfloat16 moves an inner product by at most :func:`bf16_error_bound` (the inputs' share, relative to
  the norms, plus the output's, relative to the stored value), so only the candidates that could
  still reach the k-th are re-ranked (13 of 32 on average in ``benchmarks/zlap.py``), and when the best
  candidate left out scores below the k-th exact one by more than the bound, no point outside the
  candidates can be a neighbour. Rows that fail the check (near-ties at the candidates' edge) are
  searched again exactly in fp32. The answer is the exact one (up to ties).

``engine="auto"`` picks torch on an accelerator. On CPU it picks faiss, or for a search of at least
:data:`BF16_MIN_ENTRIES` similarities ``torch-bf16`` when a one-off probe finds this CPU's bfloat16
products at least :data:`BF16_MIN_SPEEDUP` times as fast as fp32 ones (on 2 AVX512-BF16 cores:
2.4x faster than faiss at N = 50,000; ``benchmarks/zlap.py --engine``). (On 2 CPU cores the
symmetric torch search measured slower than faiss despite half the products — faiss fuses the top-k
into its GEMM loop — so it is the GPU path and a CPU fallback.) Memory stays O(M·k) plus one tile.

And one approximate engine for large CPU graphs, where the exact search is most of ZLaP's time:

* ``"faiss-ivf"``: a ``faiss.IndexIVFFlat`` (spherical k-means into ``2·sqrt(N)`` lists, each query
  scans the ``nprobe`` nearest lists: by default a fiftieth of them, and enough for about 1,000
  candidates per query). A row that finds fewer than ``k`` candidates falls back to the exact
  search. Measure its agreement before trusting it (``benchmarks/zlap.py --engine faiss-ivf``
  prints prediction agreement with the exact reference).

With ``progress=True`` a search of at least :data:`PROGRESS_MIN_ENTRIES` similarities (about a
second of CPU work) shows a progress bar over its queries; faiss then searches them in chunks
(measured 4% slower than one call at N = 50,000 in chunks of 8,192).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

Engine = Literal["auto", "faiss", "torch", "torch-bf16", "faiss-ivf"]
ENGINES = ("auto", "faiss", "torch", "torch-bf16", "faiss-ivf")

__all__ = ["ENGINES", "Engine", "bf16_error_bound", "knn", "self_knn"]

#: ``auto`` on CPU considers ``torch-bf16`` for searches of at least this many similarities (2 cores,
#: d = 512: faiss is faster below about N = 2,500 points, bfloat16 screening 1.7x faster at N = 4,000)
BF16_MIN_ENTRIES = 1 << 24
#: ... and picks it when bfloat16 products run at least this many times as fast as fp32 ones
BF16_MIN_SPEEDUP = 2.5
_BF16_PROBE: dict[str, float] = {}

#: a search of at least this many query-base similarities shows a progress bar when asked to
PROGRESS_MIN_ENTRIES = 1 << 30
#: queries per faiss call when a progress bar is shown (at least; at most ~50 updates in all)
PROGRESS_CHUNK = 8192


@contextmanager
def _bar(queries: int, candidates: int, progress: bool) -> Iterator[Any]:
    """A tqdm bar over ``queries`` rows when ``progress`` and the search is large, else ``None``."""
    if not progress or queries * candidates < PROGRESS_MIN_ENTRIES:
        yield None
        return
    from vlweak.progress import progress_bar

    bar = progress_bar(total=queries, desc="kNN graph", unit="img")
    try:
        yield bar
    finally:
        bar.close()


def _chunks(m: int, bar: Any) -> list[slice]:
    """Query chunks of a faiss search: one call without a bar, else chunks the bar can count."""
    if bar is None:
        return [slice(0, m)]
    step = max(PROGRESS_CHUNK, math.ceil(m / 50))
    return [slice(a, a + step) for a in range(0, m, step)]


def _check(features: Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be a 2-d tensor [n, d], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {features.dtype}")


def _merge(vals: Tensor, idx: Tensor, cand_vals: Tensor, cand_idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k largest of a running top-k and new candidates (rows aligned)."""
    all_vals = torch.cat([vals, cand_vals], dim=1)
    all_idx = torch.cat([idx, cand_idx], dim=1)
    top_vals, pos = all_vals.topk(k, dim=1)
    return top_vals, all_idx.gather(1, pos)


def _default_block(device: torch.device, engine: str = "torch") -> int:
    """Query rows per tile. On CPU the bfloat16 screen runs fastest with short, wide tiles (256 rows:
    1.3x faster than 1,024 at N = 50,000)."""
    if device.type == "cuda":
        return 4096
    return 256 if engine == "torch-bf16" else 1024


def _tile_budget(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Similarity entries per tile: 2^28 (1 GiB in fp32) on an accelerator; on CPU 2^25, or 2^24 for
    bfloat16 (32 MiB: on 2 cores a 256 x 50,000 tile ran 1.5x faster than a 256 x 100,000 one)."""
    if device.type == "cuda":
        return 1 << 28
    return 1 << 24 if dtype == torch.bfloat16 else 1 << 25


def _tile_width(block: int, n: int, device: torch.device, dtype: torch.dtype) -> int:
    """Columns per tile: as many as the budget allows, in equal parts of ``n`` (no narrow last tile)."""
    width = max(block, _tile_budget(device, dtype) // block)
    return max(1, math.ceil(n / math.ceil(n / width)))


def _torch_cross(queries: Tensor, base: Tensor, k: int, block: int, bar: Any = None) -> tuple[Tensor, Tensor]:
    m, n = queries.shape[0], base.shape[0]
    sims = torch.full((m, k), float("-inf"), dtype=queries.dtype, device=queries.device)
    idx = torch.full((m, k), -1, dtype=torch.long, device=queries.device)
    width = _tile_width(block, n, queries.device, queries.dtype)
    for a in range(0, m, block):
        rows = slice(a, a + block)
        for b in range(0, n, width):
            tile = queries[rows] @ base[b : b + width].T
            v, i = tile.topk(min(k, tile.shape[1]), dim=1)
            sims[rows], idx[rows] = _merge(sims[rows], idx[rows], v, i + b, k)
        if bar is not None:
            bar.update(min(block, m - a))
    return sims, idx


def _torch_self(features: Tensor, k: int, block: int, bar: Any = None) -> tuple[Tensor, Tensor]:
    """Symmetric self-search: each row block ``[a, a+B)`` is multiplied only with columns ``>= a``.

    A tile feeds the top-k of its rows and, for columns past the row block, the top-k of its columns
    (the rows before ``a`` reached those columns in earlier strips). Half the products of a plain
    search; the diagonal is masked so a point never finds itself.
    """
    n = features.shape[0]
    sims = torch.full((n, k), float("-inf"), dtype=features.dtype, device=features.device)
    idx = torch.full((n, k), -1, dtype=torch.long, device=features.device)
    width = _tile_width(block, n, features.device, features.dtype)
    for a in range(0, n, block):
        rows = features[a : a + block]
        ra = rows.shape[0]
        for b in range(a, n, width):
            tile = rows @ features[b : b + width].T  # [ra, rb], columns b .. b + rb
            if b == a:
                tile[:, :ra].fill_diagonal_(float("-inf"))
            v, i = tile.topk(min(k, tile.shape[1]), dim=1)
            sims[a : a + ra], idx[a : a + ra] = _merge(sims[a : a + ra], idx[a : a + ra], v, i + b, k)
            # columns past the row block learn about these rows
            off = a + ra - b if b == a else 0
            if tile.shape[1] > off:
                cols = tile[:, off:].T.contiguous()  # [rb', ra]
                v, i = cols.topk(min(k, ra), dim=1)
                c0, c1 = b + off, b + tile.shape[1]
                sims[c0:c1], idx[c0:c1] = _merge(sims[c0:c1], idx[c0:c1], v, i + a, k)
        if bar is not None:
            bar.update(ra)
    return sims, idx


def _search_in_chunks(index: Any, queries: Tensor, k: int, bar: Any) -> tuple[Tensor, Tensor]:
    q_np = queries.detach().float().contiguous().numpy()
    dist, ids = [], []
    for rows in _chunks(len(q_np), bar):
        d, i = index.search(q_np[rows], k)
        dist.append(torch.from_numpy(d))
        ids.append(torch.from_numpy(i).long())
        if bar is not None:
            bar.update(len(d))
    return torch.cat(dist), torch.cat(ids)


def _faiss_search(queries: Tensor, base: Tensor, k: int, bar: Any = None) -> tuple[Tensor, Tensor]:
    import faiss  # imported lazily: optional at import time, required for this engine

    base_np = base.detach().float().contiguous().numpy()
    index = faiss.IndexFlatIP(base_np.shape[1])
    index.add(base_np)
    d, i = _search_in_chunks(index, queries, k, bar)
    return d.to(queries.dtype), i


def _faiss_ivf_search(
    queries: Tensor, base: Tensor, k: int, nprobe: int | None = None, bar: Any = None
) -> tuple[Tensor, Tensor]:
    import faiss

    base_np = base.detach().float().contiguous().numpy()
    n, d = base_np.shape
    nlist = max(1, min(int(round(2 * math.sqrt(n))), n // 39))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 64  # k-means on a sample: training stays a small part of the search
    index.train(base_np)
    index.add(base_np)
    # scan a fiftieth of the lists, and at least ~1,000 candidates per query (small sets stay near exact)
    index.nprobe = min(nlist, nprobe or max(4, nlist // 50, math.ceil(1000 * nlist / n)))
    sims, idx = _search_in_chunks(index, queries, k, bar)
    short = (idx < 0).any(dim=1).nonzero().squeeze(1)
    if len(short):  # a query whose probed lists hold fewer than k points: search it exactly
        s, i = _faiss_search(queries[short], base, k)
        sims[short], idx[short] = s.float(), i
    return sims.to(queries.dtype), idx


def _drop_self(sims: Tensor, idx: Tensor, k: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """From k+1 results per row, drop the row's own index (``rows``: each row's index, default its
    position), or the last one if it is absent."""
    rows = (torch.arange(idx.shape[0], device=idx.device) if rows is None else rows).unsqueeze(1)
    drop = idx == rows
    missing = ~drop.any(dim=1)
    drop[missing, -1] = True
    keep = (~drop).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
    return sims.gather(1, keep), idx.gather(1, keep)


def bf16_error_bound(d: int, scale: float = 1.0, value: Tensor | float | None = None) -> Tensor | float:
    """How far a bfloat16 inner product can be from the exact one: two ``d``-dimensional vectors whose
    norms multiply to at most ``scale``, rounded to bfloat16 (unit roundoff ``u = 2^-8``), multiplied with
    fp32 accumulation, and the result rounded to bfloat16.

    ``(2u + 2u^2 + d * 2^-23) * scale`` from the inputs and the accumulation (relative to
    ``sum |x_i| |y_i| <= |x| |y|``), plus ``u |v| / (1 - u)`` from rounding the output ``v``: ``value``
    (a stored bfloat16 result, or a tensor of them) when given, else its largest possible size ``scale``.
    """
    u = 2.0**-8
    size = scale if value is None else abs(value)
    return (2 * u + 2 * u * u + d * 2.0**-23) * scale + u / (1 - u) * size


def _bf16_is_fast() -> bool:
    """Whether bfloat16 matrix products run :data:`BF16_MIN_SPEEDUP` times as fast as fp32 ones here
    (measured once per process on a 1024 x 512 x 8192 product)."""
    if "cpu" not in _BF16_PROBE:
        import time

        a, b = torch.randn(1024, 512), torch.randn(8192, 512)
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y.T  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                x @ y.T
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
        _BF16_PROBE["cpu"] = best[torch.float32] / max(best[torch.bfloat16], 1e-9)
    return _BF16_PROBE["cpu"] >= BF16_MIN_SPEEDUP


@contextmanager
def _fp32_reductions(device: torch.device) -> Iterator[None]:
    """bfloat16 products with fp32 accumulation on CUDA too (the error bound assumes it)."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def _exact_at(queries: Tensor, base: Tensor, cand: Tensor, need: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` by exact fp32 inner product among the first ``need[i]`` candidates ``cand[i]`` of
    each query: one sampled product (``torch.sparse.sampled_addmm``) over those pairs only."""
    m, width = cand.shape
    keep = torch.arange(width, device=cand.device) < need.unsqueeze(1)
    cols, _ = torch.where(keep, cand, base.shape[0]).sort(dim=1)  # CSR order; dropped ones last
    keep = cols < base.shape[0]
    # 32-bit indices where they fit: every sparse backend takes them (cuSPARSE's SDDMM among them)
    index = torch.int32 if max(m * width, base.shape[0]) < 2**31 else torch.long
    crow = torch.zeros(m + 1, dtype=index, device=cand.device)
    crow[1:] = keep.sum(dim=1).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        pattern = torch.sparse_csr_tensor(crow, cols[keep].to(index), torch.zeros(int(crow[-1]), device=cand.device),
                                          (m, base.shape[0]), check_invariants=False)
    exact = torch.full(cand.shape, float("-inf"), dtype=torch.float32, device=cand.device)
    exact[keep] = torch.sparse.sampled_addmm(pattern, queries, base.T, beta=0.0).values()
    sims, pos = exact.topk(k, dim=1)
    return sims, cols.gather(1, pos)


def _bf16_search(queries: Tensor, base: Tensor | None, k: int, block: int, bar: Any = None) -> tuple[Tensor, Tensor]:
    """``torch-bf16``: bfloat16 candidates, exact fp32 re-ranking, verified (module notes)."""
    full = queries if base is None else base
    n = full.shape[0] - (1 if base is None else 0)
    width = min(n, max(32, 2 * k))  # candidates per query
    q16 = queries.to(torch.bfloat16)
    with _fp32_reductions(queries.device):
        if base is None:
            cand_s, cand_i = _drop_self(*_torch_cross(q16, q16, width + 1, block, bar), width)
        else:
            cand_s, cand_i = _torch_cross(q16, base.to(torch.bfloat16), width, block, bar)
    q32, b32 = queries.float(), full.float()
    cand = cand_s.float()
    # each candidate's exact similarity lies in [low, high]
    err = bf16_error_bound(queries.shape[1], float(q32.norm(dim=1).max() * b32.norm(dim=1).max()), cand)
    high, low = cand + err, cand - err
    # the k-th exact similarity is at least low[k-1]; candidates that cannot reach it are never
    # re-ranked (a prefix of each row, which is sorted by its bfloat16 score)
    need = (high >= low[:, k - 1 : k]).sum(dim=1).clamp_min(k)
    sims, idx = _exact_at(q32, b32, cand_i, need, k)
    if width < n:  # a point outside the candidates could still be a neighbour: search those rows again
        redo = (high[:, -1] >= sims[:, -1]).nonzero().flatten()
        if len(redo):
            if base is None:
                s, i = _torch_cross(q32[redo], b32, k + 1, block)
                s, i = _drop_self(s, i, k, rows=redo)
            else:
                s, i = _torch_cross(q32[redo], b32, k, block)
            sims[redo], idx[redo] = s, i
    return sims.to(queries.dtype), idx


def knn(
    queries: Tensor,
    base: Tensor | None = None,
    k: int = 10,
    *,
    engine: Engine = "auto",
    block_size: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """k nearest neighbours of ``queries`` in ``base`` by inner product.

    Features are expected L2-normalised (then inner product = cosine similarity). With
    ``base=None`` the queries are searched against themselves and each point's own index is
    excluded (duplicates at other indices are kept).

    Args:
        queries: ``[M, d]``.
        base: ``[N, d]`` or ``None`` for a self-search.
        k: neighbours per query; clipped to the number of candidates (``N``, or ``M - 1``).
        engine: ``"auto"``, ``"faiss"``, ``"torch"``, ``"torch-bf16"`` (bfloat16 screening,
            verified exact), or the approximate ``"faiss-ivf"``. The faiss engines search on the CPU
            (accelerator tensors are copied to the host and the answer returned on their device).
        block_size: rows (and columns) per tile of the torch engine.
        progress: show a progress bar over the queries when the search is large (see the module notes).

    Returns:
        ``(sims [M, k'], idx [M, k'])``, each row sorted by decreasing similarity.

    Raises:
        ValueError: on a bad shape, ``k < 1``, too few candidates or an unknown engine.
    """
    _check(queries, "queries")
    if base is not None:
        _check(base, "base")
        if base.shape[1] != queries.shape[1]:
            raise ValueError(f"dimension mismatch: queries d={queries.shape[1]}, base d={base.shape[1]}")
        if base.device != queries.device:
            raise ValueError(f"queries on {queries.device} but base on {base.device}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    candidates = queries.shape[0] - 1 if base is None else base.shape[0]
    if candidates < 1:
        raise ValueError("need at least one candidate neighbour (two points for a self-search)")
    k = min(k, candidates)
    if engine not in ENGINES:
        raise ValueError(f"unknown kNN engine {engine!r}; use one of {', '.join(ENGINES)}")
    on_cpu = queries.device.type == "cpu"
    if engine.startswith("faiss") and not on_cpu:  # faiss-cpu: search a host copy, answer on the device
        device = queries.device
        sims, idx = knn(queries.cpu(), None if base is None else base.cpu(), k, engine=engine, progress=progress)
        return sims.to(device), idx.to(device)
    if engine == "auto":
        engine = "faiss" if on_cpu else "torch"
        if on_cpu and queries.shape[0] * (candidates + 1) >= BF16_MIN_ENTRIES and _bf16_is_fast():
            engine = "torch-bf16"
    block = block_size or _default_block(queries.device, engine)

    with torch.no_grad(), _bar(queries.shape[0], candidates + 1, progress) as bar:
        if engine == "faiss-ivf":
            if base is None:
                return _drop_self(*_faiss_ivf_search(queries, queries, k + 1, bar=bar), k)
            return _faiss_ivf_search(queries, base, k, bar=bar)
        if engine == "faiss":
            if base is None:
                return _drop_self(*_faiss_search(queries, queries, k + 1, bar), k)
            return _faiss_search(queries, base, k, bar)
        if engine == "torch-bf16":
            return _bf16_search(queries, base, k, block, bar)
        if base is None:
            return _torch_self(queries, k, block, bar)
        return _torch_cross(queries, base, k, block, bar)


def self_knn(features: Tensor, k: int = 10, **kwargs) -> tuple[Tensor, Tensor]:
    """``knn(features, None, k)``: neighbours within one set, self excluded."""
    return knn(features, None, k, **kwargs)
