"""The side-by-side Lanczos table of ``analysis=benchmark``: the suite's paths and its peers on one job.

Every row runs ``analysis.side_steps`` Lanczos steps of the Hessian (one row: the GGN) of the same
model, batches and mean loss from the same seeded Rademacher start vector(s), in the run's dtype.
Columns: wall seconds including operator set-up, peak memory above the row's start (CPU: resident
set size sampled every 2 ms; CUDA: peak allocated), curvature products (full-data passes), top Ritz
value and its relative difference from the reference row, and the largest moment difference
``max_k |m_k - m_k(ref)| / rho^k`` for ``k = 1..4`` (``rho`` the reference's largest |Ritz value|).
Ratios are taken within the one run, so machine load shifts them less than the seconds.

Text batches (``dataset=text``, a language model's ``(N, T, V)`` logits and ``(N, T)`` targets) run as
they are through the suite's rows and through :class:`experiments.peers.TokenRows` for the peers.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Callable

import torch
from omegaconf import DictConfig

from curvature.lanczos import lanczos, random_start_vectors
from curvature.losses import as_loss
from curvature.operators import make_operator
from experiments import peers as P
from experiments import validate as V


def validate_side_by_side(cfg: DictConfig) -> dict:
    names = V.choice_list(cfg, "analysis.peers", P.PEERS, "analysis.peers=[pyhessian,curvlinops]", default=[])
    for name in names:  # explicitly asked for: a missing one is an error, not a silent skip
        why = P.missing(name)
        if why:
            raise V.ConfigError("analysis.peers", names, why, f"analysis.peers=[{','.join(n for n in names if n != name)}]")
    enabled = bool(names) or V.boolean(cfg, "analysis.side_by_side")
    if names and V.get(cfg, "operator.loss") != "cross_entropy":
        raise V.ConfigError("operator.loss", V.get(cfg, "operator.loss"), "the peers run mean cross-entropy",
                            "operator.loss=cross_entropy")
    if names and V.get(cfg, "operator.params", None):
        raise V.ConfigError("operator.params", V.get(cfg, "operator.params"),
                            "the peers act on all parameters", "operator.params=null")
    return {"enabled": enabled, "peers": names,
            "steps": V.positive_int(cfg, "analysis.side_steps", "analysis.side_steps=20"),
            "num_vectors": V.integer(cfg, "analysis.side_vectors", minimum=0, example="analysis.side_vectors=10"),
            "targets": {k: V.positive_number(cfg, f"analysis.targets.{k}")
                        for k in ("peer_speedup", "multi_vector_speedup", "ggn_speedup", "memory_factor",
                                  "agreement")}}


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include freed pages
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled resident set size."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        _trim()  # hand freed heap back to the OS, or an earlier row's pages hide this row's growth
        self.base, self.top, self.stop = self.rss(), self.rss(), threading.Event()

        def sample():
            while not self.stop.wait(0.002):
                self.top = max(self.top, self.rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.top, self.rss()) - self.base
        return False


def _timed(fn: Callable, device: torch.device) -> tuple[float, int, object]:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory.peak, out


def _moments(values: torch.Tensor, weights: torch.Tensor) -> list[float]:
    return [float((weights * values ** k).sum()) for k in range(1, 5)]


def side_by_side(run, model, loss_fn, batches, s: dict) -> list[dict]:
    """Run every row, add the table, metrics and checks to ``run``; return the rows."""
    o, sb, device = s["operator"], s["side_by_side"], run.device
    steps, k = sb["steps"], sb["num_vectors"]
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    starts = random_start_vectors(num_params, max(k, 1), "rademacher", run.seed, run.dtype, device)
    start = random_start_vectors(num_params, 1, "rademacher", run.seed, run.dtype, device)

    def suite(name: str, vectors: torch.Tensor, **kwargs):
        def job():
            op = make_operator(name, model, loss_fn, batches, bn_mode=o["bn_mode"], params=o["params"],
                               check_deterministic=False, **kwargs)
            res = lanczos(op.matvec, op.num_params, steps, start_vectors=vectors, dtype=run.dtype, device=device,
                          engine="native")  # analysis=spectrum's default engine: m products for m steps
            mask = res.mask
            values, weights = res.ritz_values[mask].reshape(-1), res.ritz_weights[mask].reshape(-1) / len(mask)
            return values, weights, op.num_products, [f"{op.engine} products, cache {op.cache}"]
        return job

    def singles():
        values, weights, products = [], [], 0
        for j in range(k):
            v, w, n, _ = suite("hessian", starts[:, j:j + 1])()
            values.append(v), weights.append(w / k)
            products += n
        return torch.cat(values), torch.cat(weights), products

    def peer(name: str):
        def job():
            r = P.run_peer(name, model, batches, start[:, 0], steps)
            return r.ritz_values, r.ritz_weights, r.num_products, r.notes
        return job

    plan = [("suite hessian (default: cached primal)", "suite", 1, suite("hessian", start)),
            ("suite hessian (cache=none, primal recomputed)", "suite", 1, suite("hessian", start, cache="none")),
            ("suite ggn (default)", None, 1, suite("ggn", start))]
    if k > 1:
        plan += [(f"suite hessian, {k} vectors in one pass", f"suite x{k} singles", k, suite("hessian", starts)),
                 (f"suite hessian, {k} single-vector runs", None, k, singles)]
    plan += [("suite hessian (autograd products: layerwise=false, cached)", "suite", 1,
              suite("hessian", start, layerwise=False))]
    plan += [(name, "suite", 1, peer(name)) for name in sb["peers"]]
    rows, measures = [], {}
    for label, reference, vectors, job in plan:
        print(f"side by side: {label} ...", flush=True)
        seconds, peak, out = _timed(job, device)
        values, weights, products = out[:3]
        measures[label] = (values, weights)
        rows.append({"row": label, "vectors": vectors, "seconds": seconds, "peak_memory_mb": peak / 2**20,
                     "products": products, "top_ritz": float(values.max()), "reference": reference,
                     "notes": "; ".join(out[3]) if len(out) > 3 else ""})
    return _finish(run, rows, measures, num_params, steps, k, sb, model, loss_fn, batches, o)


def _agreement(rows: list[dict], measures: dict) -> None:
    by_label = {r["row"]: r for r in rows}
    for r in rows:
        ref = {"suite": rows[0]["row"], None: None}.get(r["reference"], None)
        if r["reference"] and r["reference"].startswith("suite x"):
            ref = next(x["row"] for x in rows if "single-vector runs" in x["row"])
        if ref is None or ref == r["row"]:
            r["top_ritz_rel_diff"], r["moment_diff"] = None, None
            continue
        (v, w), (vr, wr) = measures[r["row"]], measures[ref]
        rho = float(vr.abs().max())
        r["top_ritz_rel_diff"] = abs(r["top_ritz"] - by_label[ref]["top_ritz"]) / abs(by_label[ref]["top_ritz"])
        r["moment_diff"] = max(abs(a - b) / rho ** (i + 1)
                               for i, (a, b) in enumerate(zip(_moments(v, w), _moments(vr, wr))))
        r["reference"] = ref


def _gradient_peak(model, loss_fn, batches, device, bn_mode) -> int:
    from curvature.operators import curvature_mode
    x, y = batches[0]
    params = [p for p in model.parameters() if p.requires_grad]
    loss = as_loss(loss_fn)  # a language model's (N, T, V) logits with (N, T) targets too

    def job():
        with curvature_mode(model, bn_mode), torch.enable_grad():
            return torch.autograd.grad(loss(model(x), y), params)
    job()  # warm-up
    return _timed(job, device)[1]


def _finish(run, rows, measures, num_params, steps, k, sb, model, loss_fn, batches, o) -> list[dict]:
    _agreement(rows, measures)
    t = sb["targets"]
    base = rows[0]
    for r in rows:
        r["speedup_of_default"] = r["seconds"] / base["seconds"]
    peer_rows = [r for r in rows if r["row"] in sb["peers"]]
    if peer_rows:
        fastest = min(peer_rows, key=lambda r: r["seconds"])
        speedup = fastest["seconds"] / base["seconds"]
        run.metric("speedup_vs_fastest_peer", speedup)
        run.check("speedup_vs_fastest_peer", speedup, f">= {t['peer_speedup']}x faster than the fastest peer "
                  f"({fastest['row']}), same job", speedup >= t["peer_speedup"])
        worst = max(r["top_ritz_rel_diff"] for r in peer_rows)
        run.check("peer_top_ritz_agreement", worst, f"every peer's top Ritz value within {t['agreement']:g} "
                  "relative of the suite's", worst <= t["agreement"])
    if k > 1:
        multi = rows[4]["seconds"] / rows[3]["seconds"]  # the single runs over the one pass
        run.metric("multi_vector_speedup", multi)
        run.check("multi_vector_speedup", multi, f"{k} vectors in one pass >= {t['multi_vector_speedup']}x "
                  f"faster than {k} single-vector runs of the default path", multi >= t["multi_vector_speedup"])
    ggn = rows[0]["seconds"] / rows[2]["seconds"]
    run.metric("ggn_speedup_vs_hessian", ggn)
    run.check("ggn_speedup_vs_hessian", ggn, f"GGN >= {t['ggn_speedup']}x faster than the Hessian (default "
              "paths, equal steps)", ggn >= t["ggn_speedup"])
    itemsize = torch.empty((), dtype=run.dtype).element_size()
    basis = (steps + 1) * num_params * itemsize
    grad_peak = _gradient_peak(model, loss_fn, batches, run.device, o["bn_mode"])
    bound = basis + t["memory_factor"] * grad_peak
    run.metric("gradient_pass_peak_mb", grad_peak / 2**20)
    run.metric("lanczos_basis_mb", basis / 2**20)
    for label, r in (("fallback", rows[1]), ("default", rows[0])):
        run.metric(f"peak_memory_mb_{label}", r["peak_memory_mb"])
        run.check(f"memory_{label}", r["peak_memory_mb"] * 2**20 / bound,
                  f"peak ({label} path) / (basis + {t['memory_factor']} x one-batch gradient peak) <= 1",
                  r["peak_memory_mb"] * 2**20 <= bound)
    # Capacity: the same activation footprint, the basis and 4 P-vectors (weights, gradient, products)
    # growing with P; an estimate for deeper/wider nets whose activations grow less than P.
    per_param = (steps + 1 + 4) * itemsize
    for gb in (24, 80):
        run.metric(f"max_params_fallback_{gb}GB", max(gb * 1e9 - t["memory_factor"] * grad_peak, 0) / per_param)
    run.table("side_by_side", rows)
    print(markdown(rows), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| row | vectors | seconds | x default | peak MB | products | top Ritz | rel. diff | moments diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['row']} | {r['vectors']} | {r['seconds']:.2f} | {r['speedup_of_default']:.2f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['products']} | {r['top_ritz']:.6g} | "
                     f"{fmt(r['top_ritz_rel_diff'], '.1e')} | {fmt(r['moment_diff'], '.1e')} |")
    return "\n".join(lines)
