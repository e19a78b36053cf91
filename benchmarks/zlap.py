"""Time ZLaP's transductive solve against the reference (per-class) formulation.

vlweak's path: exact kNN (the `auto` engine: faiss, or bfloat16 screening verified in fp32 on CPUs
with fast bfloat16; symmetric blockwise torch on GPU), one sparse graph, one
multi-right-hand-side CG for all classes. The reference formulation: exact kNN with faiss
(``IndexFlatIP``, self-search), a SciPy sparse graph, and one CG solve per class — SciPy's ``cg`` on
CPU, a single-column torch CG per class on GPU. Both solve to the same relative tolerance (1e-6,
at most 50 iterations); the table reports time, agreement of the arg-max predictions, and the speed
ratio.

Data are synthetic (``--n`` images in ``--classes`` gaussian clusters on the unit sphere in ``--d``
dimensions, noisy class "text" embeddings): the timings depend on N, d, C and k, not on the content.

Examples::

    python benchmarks/zlap.py --quick
    python benchmarks/zlap.py --n 50000 --d 512 --classes 100 1000 --threads 2
    python benchmarks/zlap.py --device cuda --n 1000000 --classes 1000 --skip-reference
    python benchmarks/zlap.py --n 12500 25000 50000 --classes 100 --skip-reference   # growth with N
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import normalize

from vlweak.graph import build_zlap_graph, class_solutions, conjugate_gradient, knn, query_edges
from vlweak.graph.knn import ENGINES
from vlweak.graph.propagation import propagation_operator


def synthetic(n: int, d: int, c: int, seed: int = 0, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    means = normalize(torch.randn(c, d, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    images = torch.empty(n, d)
    for start in range(0, n, 65536):  # chunked to keep the peak small at large N
        lab = labels[start : start + 65536]
        images[start : start + 65536] = normalize(means[lab] + 1.2 * torch.randn(len(lab), d, generator=g) / d**0.5)
    gap = normalize(torch.randn(1, d, generator=g), dim=1)
    text = normalize(means + 0.8 * gap + 1.0 * torch.randn(c, d, generator=g) / d**0.5, dim=1)
    return images.to(device), text.to(device), labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def run_vlweak(images: Tensor, text: Tensor, k: int, gamma: float, alpha: float, engine: str) -> dict[str, Any]:
    device = images.device
    edges, t_knn = _timed(lambda: query_edges(images, None, text, k, gamma, engine=engine), device)
    graph, t_graph = _timed(lambda: build_zlap_graph(images, text, k, gamma, edges=edges), device)
    result, t_solve = _timed(lambda: class_solutions(graph, alpha), device)
    pred = result.x[graph.num_classes :].argmax(1)
    return {"knn": t_knn, "graph": t_graph, "solve": t_solve, "iters": result.iterations, "pred": pred.cpu()}


def _reference_knn_faiss(images: np.ndarray, text: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    import faiss

    index = faiss.IndexFlatIP(images.shape[1])
    index.add(images)
    s_ii, i_ii = index.search(images, k + 1)  # the point itself comes back (first, up to ties)
    tindex = faiss.IndexFlatIP(text.shape[1])
    tindex.add(text)
    s_it, i_it = tindex.search(images, min(k, text.shape[0]))
    return s_ii, i_ii, s_it, i_it


def _reference_graph_scipy(s_ii, i_ii, s_it, i_it, c: int, gamma: float):
    import scipy.sparse as sp

    n = s_ii.shape[0]
    rows = np.concatenate([np.repeat(np.arange(n), s_ii.shape[1]), np.repeat(np.arange(n), s_it.shape[1])]) + c
    cols = np.concatenate([i_ii.ravel() + c, i_it.ravel()])
    vals = np.concatenate([np.maximum(s_ii.ravel(), 0), np.maximum(s_it.ravel(), 0) ** gamma]).astype(np.float32)
    w = sp.csr_matrix((vals, (rows, cols)), shape=(n + c, n + c))
    w.setdiag(0)  # the self matches
    w.eliminate_zeros()
    w = (w + w.T).tocsr()
    deg = np.asarray(w.sum(axis=1)).ravel()
    deg[deg == 0] = 1
    dm = sp.diags((1.0 / np.sqrt(deg)).astype(np.float32))
    return (dm @ w @ dm).tocsr()


def run_reference_cpu(images: Tensor, text: Tensor, k: int, gamma: float, alpha: float) -> dict[str, Any]:
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    cpu = torch.device("cpu")
    x, t = images.cpu().numpy(), text.cpu().numpy()
    knn_out, t_knn = _timed(lambda: _reference_knn_faiss(x, t, k), cpu)
    wn, t_graph = _timed(lambda: _reference_graph_scipy(*knn_out, t.shape[0], gamma), cpu)
    c, size = t.shape[0], wn.shape[0]
    lap = (sp.identity(size, dtype=np.float32, format="csr") - alpha * wn).tocsr()

    def solve() -> np.ndarray:
        scores = np.empty((size - c, c), dtype=np.float32)
        for cls in range(c):
            y = np.zeros(size, dtype=np.float32)
            y[cls] = 1
            scores[:, cls] = cg(lap, y, rtol=1e-6, maxiter=50)[0][c:]
        return scores

    scores, t_solve = _timed(solve, cpu)
    return {"knn": t_knn, "graph": t_graph, "solve": t_solve, "iters": None, "pred": torch.from_numpy(scores.argmax(1))}


def run_reference_torch(images: Tensor, text: Tensor, k: int, gamma: float, alpha: float) -> dict[str, Any]:
    """Per-class formulation on the tensors' device: plain blockwise kNN, one 1-column CG per class."""
    device = images.device

    def edges() -> tuple[Tensor, Tensor]:
        s, i = knn(images, images, k + 1, engine="torch")  # self-search without the symmetric trick
        keep = i != torch.arange(len(i), device=device).unsqueeze(1)
        keep[keep.all(1), -1] = False
        s, i = s[keep].view(len(i), k), i[keep].view(len(i), k)
        st, it = knn(images, text, k, engine="torch")
        nodes = torch.cat([i + text.shape[0], it], 1)
        return nodes, torch.cat([s.clamp_min(0), st.clamp_min(0).pow(gamma)], 1)

    e, t_knn = _timed(edges, device)
    graph, t_graph = _timed(lambda: build_zlap_graph(images, text, k, gamma, edges=e), device)

    def solve() -> Tensor:
        op = propagation_operator(graph, alpha)
        c = graph.num_classes
        scores = torch.empty(graph.num_images, c, device=device)
        for cls in range(c):
            y = torch.zeros(graph.num_nodes, device=device)
            y[cls] = 1
            scores[:, cls] = conjugate_gradient(op, y, tol=1e-6, maxiter=50).x[c:]
        return scores

    scores, t_solve = _timed(solve, device)
    return {"knn": t_knn, "graph": t_graph, "solve": t_solve, "iters": None, "pred": scores.argmax(1).cpu()}


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[50_000], help="images; several: one table per N")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    p.add_argument("--engine", default="auto", choices=ENGINES, help="vlweak's kNN engine")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--quick", action="store_true", help="N=5,000, d=128, C=10 and 100")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.classes = [5_000], 128, [10, 100]
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    warm_up(args)
    for n in args.n:
        table(n, args)


def warm_up(args: argparse.Namespace) -> None:
    """One untimed small run of each path first (library and thread-pool start-up, the kNN engines
    ``auto`` picks below and above its bfloat16 threshold, the reference's SciPy), so that the
    first timed table does not pay for it."""
    for n in (1_000, 6_000):
        images, text, _ = synthetic(n, args.d, 10, seed=1, device=args.device)
        run_vlweak(images, text, args.k, args.gamma, args.alpha, args.engine)
        if not args.skip_reference:
            (run_reference_cpu if torch.device(args.device).type == "cpu" else run_reference_torch)(
                images, text, args.k, args.gamma, args.alpha
            )


def table(n: int, args: argparse.Namespace) -> None:
    """Time both formulations at ``n`` images for every class count; print one table."""
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} N={n} d={args.d} k={args.k} "
          f"gamma={args.gamma} alpha={args.alpha}")
    header = f"{'C':>6} {'impl':<22} {'kNN s':>8} {'graph s':>8} {'solve s':>8} {'total s':>8} {'iters':>5} {'agree %':>8} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for c in args.classes:
        images, text, labels = synthetic(n, args.d, c, device=args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours = run_vlweak(images, text, args.k, args.gamma, args.alpha, args.engine)
        ours_total = ours["knn"] + ours["graph"] + ours["solve"]
        peak = _peak(device)
        rows = [("vlweak multi-RHS", ours, None, None)]
        if not args.skip_reference:
            ref = (run_reference_cpu if device.type == "cpu" else run_reference_torch)(
                images, text, args.k, args.gamma, args.alpha
            )
            name = "reference scipy/class" if device.type == "cpu" else "reference torch/class"
            ref_total = ref["knn"] + ref["graph"] + ref["solve"]
            agree = (ref["pred"] == ours["pred"]).float().mean().item() * 100
            rows.append((name, ref, agree, ref_total / ours_total))
        for name, r, agree, speed in rows:
            total = r["knn"] + r["graph"] + r["solve"]
            iters = "" if r["iters"] is None else str(r["iters"])
            agree_s = "" if agree is None else f"{agree:.3f}"
            speed_s = "" if speed is None else f"{speed:.2f}x"
            print(f"{c:>6} {name:<22} {r['knn']:>8.3f} {r['graph']:>8.3f} {r['solve']:>8.3f} {total:>8.3f} "
                  f"{iters:>5} {agree_s:>8} {speed_s:>8}")
        acc = (ours["pred"] == labels.cpu()).float().mean().item() * 100
        print(f"{'':>6} (vlweak accuracy on the synthetic labels {acc:.1f}%, peak memory {peak})")


if __name__ == "__main__":
    main()
