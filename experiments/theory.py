"""``analysis=theory``: the paper's claims about Lanczos as measured numbers (``analysis.claim``).

* ``thm1`` (Thm. 1): Lanczos on ``A + mu I`` from the same start vector gives the Ritz values of
  ``A`` shifted by ``mu`` (and the same weights): shifting teaches nothing.
* ``thm2`` (Thm. 2): with a random start vector the ``m`` Ritz values are not the top ``m``
  eigenvalues; over many draws, how many of the top ``m`` are matched.
* ``table1`` (Table 1, App. B.1): the Lanczos and power-iteration bound terms, written as
  ``table1.csv`` / ``table1.md``, and both methods run on matrices with that eigenvalue ratio.
* ``lemma1`` (Lemma 1): the spread of ``u^T A^k u`` over random unit vectors ``u`` falls like
  ``n^{-1/2}``; fitted log-log slope.

thm1 and thm2 take the operator from the matrix dataset (``dataset=synthetic_spectrum`` ...) through
:func:`matrix_operator`; a network operator can be plugged in as another :class:`Operator` source.

    python -m experiments.run experiment=table1      # or thm1, thm2, lemma1
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from curvature import plotting
from curvature import theory as T
from curvature.io import write_bytes_atomic
from curvature.lanczos import lanczos, random_start_vectors
from curvature.seeding import stream_seed
from experiments import validate as V
from experiments.matrices import build_matrix, validate_matrix_dataset
from experiments.runtime import Run

CLAIMS = ("thm1", "thm2", "table1", "lemma1")
LEMMA1_DATASETS = ("wigner", "marchenko_pastur")


# --- validation --------------------------------------------------------------------------------
def _validate_thm1(cfg) -> dict:
    dataset = validate_matrix_dataset(cfg)
    return {"dataset": dataset,
            "shifts": V.number_list(cfg, "analysis.thm1.shifts", example="analysis.thm1.shifts=[-10,10]"),
            "num_steps": V.integer(cfg, "analysis.thm1.num_steps", 1, dataset["n"],
                                   "analysis.thm1.num_steps=30"),
            "tolerance": V.positive_number(cfg, "analysis.thm1.tolerance", "analysis.thm1.tolerance=1e-8")}


def _validate_thm2(cfg) -> dict:
    dataset = validate_matrix_dataset(cfg)
    return {"dataset": dataset,
            "num_steps": V.integer(cfg, "analysis.thm2.num_steps", 1, dataset["n"],
                                   "analysis.thm2.num_steps=20"),
            "num_draws": V.positive_int(cfg, "analysis.thm2.num_draws", "analysis.thm2.num_draws=50"),
            "match_tolerance": V.positive_number(cfg, "analysis.thm2.match_tolerance",
                                                 "analysis.thm2.match_tolerance=1e-3"),
            "max_matched_fraction": V.number(cfg, "analysis.thm2.max_matched_fraction", 0.0, 1.0,
                                             example="analysis.thm2.max_matched_fraction=0.5"),
            "exact_max_dim": V.integer(cfg, "analysis.exact_max_dim", minimum=0,
                                       example="analysis.exact_max_dim=4000")}


def _validate_table1(cfg) -> dict:
    dim = V.integer(cfg, "analysis.table1.empirical_dim", minimum=3, example="analysis.table1.empirical_dim=1000")
    return {"ratios": V.number_list(cfg, "analysis.table1.ratios", 1.0, strict=True,
                                  example="analysis.table1.ratios=[1.5,1.1,1.01]"),
            "steps": V.int_list(cfg, "analysis.table1.steps", 1, None, "analysis.table1.steps=[5,10,15,20,25]"),
            "empirical_dim": dim,
            "empirical_steps": V.integer(cfg, "analysis.table1.empirical_steps", 1, dim - 1,
                                         "analysis.table1.empirical_steps=25"),
            "rounding": V.positive_number(cfg, "analysis.table1.rounding", "analysis.table1.rounding=1e-12")}


def _validate_lemma1(cfg) -> dict:
    dataset = validate_matrix_dataset(cfg)
    if dataset["name"] not in LEMMA1_DATASETS:
        raise V.ConfigError("dataset.name", dataset["name"], "claim lemma1 needs a random-matrix "
                            f"family: {', '.join(LEMMA1_DATASETS)}", "dataset=wigner")
    sizes = V.int_list(cfg, "analysis.lemma1.sizes", 2, None, "analysis.lemma1.sizes=[100,400,1600]")
    if len(set(sizes)) < 2:
        raise V.ConfigError("analysis.lemma1.sizes", sizes, "needs at least two different sizes to fit a slope",
                            "analysis.lemma1.sizes=[100,400,1600]")
    return {"dataset": dataset, "sizes": sorted(set(sizes)),
            "powers": sorted(set(V.int_list(cfg, "analysis.lemma1.powers", 1, None, "analysis.lemma1.powers=[2,4]"))),
            "num_draws": V.integer(cfg, "analysis.lemma1.num_draws", 2, None, "analysis.lemma1.num_draws=20"),
            "target_slope": V.number(cfg, "analysis.lemma1.target_slope"),
            "slope_tolerance": V.positive_number(cfg, "analysis.lemma1.slope_tolerance",
                                                 "analysis.lemma1.slope_tolerance=0.2"),
            "exact_max_dim": V.integer(cfg, "analysis.exact_max_dim", minimum=0,
                                       example="analysis.exact_max_dim=4000")}


VALIDATORS = {"thm1": _validate_thm1, "thm2": _validate_thm2, "table1": _validate_table1,
              "lemma1": _validate_lemma1}


def validate(cfg: DictConfig) -> dict:
    claim = V.choice(cfg, "analysis.claim", CLAIMS, "analysis.claim=table1")
    return {"claim": claim, **VALIDATORS[claim](cfg)}


# --- the operator -------------------------------------------------------------------------------
@dataclass
class Operator:
    """A symmetric operator given as a matvec, with its exact eigenvalues when known (ascending)."""

    name: str
    matvec: Callable[[torch.Tensor], torch.Tensor]
    dim: int
    eigenvalues: Optional[torch.Tensor] = None


def matrix_operator(dataset: dict, run: Run, exact_max_dim: int = 0) -> Operator:
    """The dataset's dense matrix; exact eigenvalues if known by construction or ``n <= exact_max_dim``."""
    problem = build_matrix(dataset, run.dtype, run.device)
    matrix = problem.matrix
    eigenvalues = problem.eigenvalues
    if eigenvalues is None and problem.dim <= exact_max_dim:
        eigenvalues = torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu()
    return Operator(problem.name, lambda x: matrix @ x, problem.dim, eigenvalues)


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "theory", validate=validate) as run:
        s = run.settings
        extra = {"thm1": _thm1, "thm2": _thm2, "table1": _table1, "lemma1": _lemma1}[s["claim"]](run, s)
        return run.finish(claim=s["claim"], **(extra or {}))


# --- thm1: shifting ---------------------------------------------------------------------------
def _thm1(run: Run, s: dict) -> None:
    op = matrix_operator(s["dataset"], run)
    start = random_start_vectors(op.dim, 1, seed=run.seed, dtype=run.dtype, device=run.device)
    common = dict(start_vectors=start, dtype=run.dtype, device=run.device)
    base = lanczos(op.matvec, op.dim, s["num_steps"], **common)
    run.array("ritz_values", base.ritz_values[0])
    run.array("ritz_weights", base.ritz_weights[0])
    gaps = {}
    for i, mu in enumerate(s["shifts"]):
        shifted = lanczos(lambda x, mu=mu: op.matvec(x) + mu * x, op.dim, s["num_steps"], **common)
        if int(shifted.num_steps[0]) != int(base.num_steps[0]):
            run.note(f"mu={mu:g}: {int(shifted.num_steps[0])} Lanczos steps vs {int(base.num_steps[0])} "
                     "without the shift")
            gap = weight_gap = math.inf
        else:
            keep = base.mask[0]
            diff = (shifted.ritz_values[0] - mu - base.ritz_values[0])[keep].abs()
            gaps[mu] = diff
            gap = float(diff.max())
            weight_gap = float((shifted.ritz_weights[0] - base.ritz_weights[0])[keep].abs().max())
            run.array(f"shifted_ritz_values_{i}", shifted.ritz_values[0])
        run.metric(f"ritz_shift_gap_mu{mu:g}", gap)
        run.metric(f"ritz_weight_gap_mu{mu:g}", weight_gap)
        run.check(f"thm1_mu{mu:g}", gap, f"max |ritz(A + mu I) - mu - ritz(A)| <= {s['tolerance']:g} "
                  f"({str(run.dtype).replace('torch.', '')}, m={s['num_steps']})", gap <= s["tolerance"])
    run.array("shifts", torch.tensor(s["shifts"], dtype=torch.float64))
    run.metric("max_ritz_value", float(base.ritz_values[0][base.mask[0]].max()))
    fig, (left, right) = plotting.panel_grid(2)
    plotting.stem(left, base.ritz_values[0][base.mask[0]], base.ritz_weights[0][base.mask[0]],
                  title=f"{op.name}: Lanczos stems of A (m={s['num_steps']})")
    for mu, diff in gaps.items():
        right.semilogy(np.arange(1, len(diff) + 1), np.maximum(diff.numpy(), 1e-18), "o-", ms=3,
                       label=f"mu = {mu:g}")
    right.axhline(s["tolerance"], color="k", ls="--", lw=0.8, label="tolerance")
    right.set(xlabel="Ritz value index (ascending)", ylabel="|ritz(A + mu I) - mu - ritz(A)|",
              title="Thm. 1: shifted Ritz values minus mu")
    right.legend(fontsize=7)
    _tidy(fig)
    run.figure(fig, "thm1")


# --- thm2: Ritz values vs the top m eigenvalues ----------------------------------------------
def _thm2(run: Run, s: dict) -> None:
    op = matrix_operator(s["dataset"], run, s["exact_max_dim"])
    if op.eigenvalues is None:
        raise V.ConfigError("analysis.exact_max_dim", s["exact_max_dim"],
                            f"thm2 needs exact eigenvalues; the {op.dim} x {op.dim} matrix is larger",
                            f"analysis.exact_max_dim={op.dim}")
    m, draws = s["num_steps"], s["num_draws"]
    result = lanczos(op.matvec, op.dim, m, num_vectors=draws, seed=run.seed, dtype=run.dtype,
                     device=run.device, progress=True)
    for note in result.notes:
        run.note(note)
    eig = op.eigenvalues.to(torch.float64)
    tolerance = s["match_tolerance"] * float(eig.max() - eig.min())
    matched = torch.zeros(draws, m, dtype=torch.bool)
    for i in range(draws):
        found = T.top_eigenvalue_matches(result.ritz_values[i][result.mask[i]], eig, tolerance)
        matched[i, :len(found)] = found
    counts = matched.sum(1).double()
    limit = s["max_matched_fraction"] * m
    for name, value in (("mean", counts.mean()), ("min", counts.min()), ("max", counts.max())):
        run.metric(f"matched_{name}", float(value))
    run.metric("match_tolerance_abs", tolerance)
    run.metric("num_steps", m)
    run.array("matched", matched)
    run.array("matched_counts", counts)
    run.array("ritz_values", result.ritz_values)
    run.array("mask", result.mask)
    run.array("top_eigenvalues", torch.sort(eig, descending=True).values[:m])
    run.check("thm2_matched", float(counts.max()),
              f"every draw matches at most {s['max_matched_fraction']:g} x m = {limit:g} of the top "
              f"m={m} eigenvalues (|theta_i - lambda_i| <= {s['match_tolerance']:g} x spectral width)",
              float(counts.max()) <= limit)
    fig, axes = plotting.panel_grid(3)
    ranks = np.arange(1, m + 1)
    axes[0].bar(ranks, matched.double().mean(0).numpy(), color="tab:blue")
    axes[0].set(xlabel="rank i of the eigenvalue", ylabel="fraction of draws matched",
                title=f"{op.name}: fraction of {draws} draws with theta_i ~ lambda_i")
    axes[1].plot(ranks, torch.sort(eig, descending=True).values[:m].numpy(), "ks", ms=4, label="top m eigenvalues")
    axes[1].plot(ranks[:int(result.num_steps[0])],
                 torch.sort(result.ritz_values[0][result.mask[0]], descending=True).values.numpy(),
                 "o", color="tab:red", ms=3, label="Ritz values, draw 0")
    axes[1].set(xlabel="rank i", ylabel="value", title=f"i-th largest, m = {m} Lanczos steps")
    axes[1].legend(fontsize=7)
    axes[2].hist(counts.numpy(), bins=np.arange(-0.5, m + 1.5), color="tab:green")
    axes[2].axvline(m, color="k", ls="--", lw=0.8, label="m")
    axes[2].set(xlabel="matched of the top m", ylabel="draws", title="Thm. 2: matches per draw")
    axes[2].legend(fontsize=7)
    _tidy(fig)
    run.figure(fig, "thm2")


# --- table1: Lanczos vs power iteration -----------------------------------------------------
def _table1(run: Run, s: dict) -> dict:
    rows = T.table1_rows(s["ratios"], s["steps"])
    run.table("table1", rows)
    lanczos_ref, power_ref = T.lanczos_bound_term(1.5, 5), T.power_bound_term(1.5, 5)
    run.check("table1_lanczos_r1.5_k5", lanczos_ref, "L = 1.06e-4 at r = 1.5, k = 5 (Golub & Van Loan "
              "Table 10.1.1, to the printed digits)", f"{lanczos_ref:.2e}" == "1.06e-04")
    run.check("table1_power_r1.5_k5", power_ref, "R = 3.9e-2 at r = 1.5, k = 5 (Golub & Van Loan "
              "Table 10.1.1, to the printed digits)", f"{power_ref:.1e}" == "3.9e-02")
    empirical = [_bound_race(run, s, r) for r in s["ratios"]]
    for key in ("lanczos_error", "power_error", "lanczos_bound", "power_bound"):
        run.array(key, torch.stack([torch.as_tensor(e[key]) for e in empirical]))
    run.array("ratios", torch.tensor(s["ratios"], dtype=torch.float64))
    run.array("steps", torch.arange(1, s["empirical_steps"] + 1))
    last = s["empirical_steps"]
    for e in empirical:
        for method in ("lanczos", "power"):
            run.metric(f"{method}_error_r{e['ratio']:g}_k{last}", float(e[f"{method}_error"][-1]))
    for row in rows:
        run.metric(f"lanczos_term_r{row['ratio']:g}_k{row['k']}", row["lanczos"])
        run.metric(f"power_term_r{row['ratio']:g}_k{row['k']}", row["power"])
    slack = s["rounding"]
    for method in ("lanczos", "power"):
        excess = max(float((e[f"{method}_error"] - e[f"{method}_bound"]).max()) for e in empirical)
        run.check(f"{method}_within_bound", excess, f"lambda_1 - estimate <= its bound + {slack:g} lambda_1 "
                  "at every step (rounding)", excess <= slack)
    lead = max(float((e["lanczos_error"] - e["power_error"]).max()) for e in empirical)
    run.check("lanczos_beats_power", lead, f"Lanczos error <= power error + {slack:g} lambda_1 at every "
              "step (its Krylov space holds A^(k-1) q)", lead <= slack)
    run.figure(_draw_table1(s, rows, empirical), "table1")
    files = {"table1.csv": _table1_csv(rows), "table1.md": _table1_markdown(rows)}
    for name, text in files.items():
        write_bytes_atomic(run.out_dir / name, text.encode())
    return {"table_files": sorted(files)}


def _bound_race(run: Run, s: dict, ratio: float) -> dict:
    """Both methods on ``diag(r, linspace(1, 0, n - 1))``: lambda_1/lambda_2 = r, lambda_n = 0.

    Lanczos and power iteration from a Gaussian start vector are invariant under orthogonal
    similarity, so the diagonal matrix stands for every matrix with this spectrum. Errors are
    relative to lambda_1.
    """
    n, steps = s["empirical_dim"], s["empirical_steps"]
    diagonal = torch.cat([torch.tensor([ratio], dtype=torch.float64),
                          torch.linspace(1.0, 0.0, n - 1, dtype=torch.float64)]).to(run.dtype).to(run.device)
    matvec = lambda x: diagonal.unsqueeze(-1) * x  # noqa: E731  (both methods pass (n, b) blocks)
    start = random_start_vectors(n, 1, seed=stream_seed(run.seed, "theory.table1"), dtype=run.dtype,
                                 device=run.device)
    result = lanczos(matvec, n, steps, start_vectors=start, dtype=run.dtype, device=run.device)
    done = int(result.num_steps[0])
    top = [float(result.truncated(min(k, done)).ritz_values[0].max()) for k in range(1, steps + 1)]
    power = T.power_iteration(matvec, start[:, 0], steps)
    tan2 = T.tan2_start_angle(start[:, 0].cpu(), torch.eye(n, 1, dtype=torch.float64))
    ks = range(1, steps + 1)
    return {
        "ratio": ratio,
        "lanczos_error": (ratio - torch.tensor(top, dtype=torch.float64)) / ratio,
        "power_error": (ratio - power) / ratio,
        "lanczos_bound": torch.tensor([T.lanczos_error_bound(ratio, 1.0, 0.0, tan2, k) for k in ks]) / ratio,
        "power_bound": torch.tensor([T.power_error_bound(ratio, 1.0, 0.0, tan2, k) for k in ks]) / ratio,
    }


def _table1_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["ratio", "k", "lanczos", "power"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"ratio": repr(row["ratio"]), "k": row["k"], "lanczos": repr(row["lanczos"]),
                         "power": repr(row["power"])})
    return buffer.getvalue()


def _table1_markdown(rows: list[dict]) -> str:
    lines = ["Paper Table 1 (Golub & Van Loan Table 10.1.1): lower-bound terms after k steps, "
             "r = lambda_1 / lambda_2.", "",
             "| r | k | Lanczos L = 1 / C_{k-1}(2r - 1)^2 | power R = r^{-2(k-1)} |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['ratio']:g} | {r['k']} | {r['lanczos']:.2e} | {r['power']:.2e} |" for r in rows]
    return "\n".join(lines) + "\n"


def _draw_table1(s: dict, rows: list[dict], empirical: list[dict]):
    fig, axes = plotting.panel_grid(1 + len(empirical))
    for r in s["ratios"]:
        sub = [row for row in rows if row["ratio"] == r]
        line, = axes[0].semilogy([x["k"] for x in sub], [x["lanczos"] for x in sub], "o-", ms=3,
                                 label=f"Lanczos, r={r:g}")
        axes[0].semilogy([x["k"] for x in sub], [x["power"] for x in sub], "s--", ms=3,
                         color=line.get_color(), label=f"power, r={r:g}")
    axes[0].set(xlabel="k", ylabel="bound term", title="Table 1: L (Lanczos) vs R (power)")
    axes[0].legend(fontsize=6)
    ks = np.arange(1, s["empirical_steps"] + 1)
    floor = 1e-17
    for ax, e in zip(axes[1:], empirical):
        for method, color in (("lanczos", "tab:red"), ("power", "tab:blue")):
            ax.semilogy(ks, np.maximum(e[f"{method}_error"].numpy(), floor), "o-", ms=3, color=color,
                        label=f"{method} error")
            ax.semilogy(ks, np.maximum(e[f"{method}_bound"].numpy(), floor), "--", color=color, lw=0.8,
                        label=f"{method} bound")
        ax.set_ylim(bottom=floor)
        ax.set(xlabel="step k (products)", ylabel="relative error of lambda_1",
               title=f"r = {e['ratio']:g}, n = {s['empirical_dim']}")
        ax.legend(fontsize=6)
    _tidy(fig)
    return fig


# --- lemma1: one vector suffices in high dimension ---------------------------------------------
def _lemma1(run: Run, s: dict) -> None:
    """The statistic: ``X = u^T A^k u`` with ``u = g / ||g||``, ``g ~ N(0, I_n)`` (uniform on the
    sphere): the k-th moment of the Lanczos stem measure of start vector ``u``, an unbiased estimate of
    ``tr(A^k) / n``. The paper's ``v^T A^k v / n`` with an unnormalised Gaussian ``v`` is
    ``X ||g||^2 / n``; the extra factor has std ``sqrt(2 / n)``, so both spreads fall like ``n^{-1/2}``.
    The spread is the sample std of X over ``num_draws`` vectors, for a fresh matrix at each size.
    """
    sizes, powers, draws = s["sizes"], s["powers"], s["num_draws"]
    run.note(f"dataset.n is not used: the sizes are analysis.lemma1.sizes = {sizes}")
    spread = {k: [] for k in powers}
    exact = {k: [] for k in powers}
    for n in sizes:
        problem = build_matrix({**s["dataset"], "n": n}, run.dtype, run.device)
        matrix = problem.matrix
        vectors = random_start_vectors(n, draws, seed=stream_seed(run.seed, f"theory.lemma1.n{n}"),
                                       dtype=run.dtype, device=run.device)
        forms = T.quadratic_forms(lambda x: matrix @ x, vectors, powers)
        for k in powers:
            spread[k].append(float(forms[k].std()))
            exact[k].append(T.sphere_quadratic_form_std(*T.power_moments(matrix, k), n)
                            if n <= s["exact_max_dim"] else math.nan)
            run.array(f"forms_k{k}_n{n}", forms[k])
    run.array("sizes", torch.tensor(sizes))
    for k in powers:
        run.array(f"spread_k{k}", torch.tensor(spread[k], dtype=torch.float64))
        run.array(f"exact_std_k{k}", torch.tensor(exact[k], dtype=torch.float64))
        slope, _ = T.loglog_slope(sizes, spread[k])
        run.metric(f"slope_k{k}", slope)
        known = [(n, e) for n, e in zip(sizes, exact[k]) if not math.isnan(e)]
        if len(known) >= 2:
            run.metric(f"exact_slope_k{k}", T.loglog_slope(*zip(*known))[0])
            ratio = [sp / e for sp, e in zip(spread[k], exact[k]) if not math.isnan(e)]
            run.metric(f"spread_over_exact_max_k{k}", max(ratio))
            run.metric(f"spread_over_exact_min_k{k}", min(ratio))
        gap = abs(slope - s["target_slope"])
        run.check(f"lemma1_slope_k{k}", slope, f"log-log slope of std(u^T A^{k} u) vs n within "
                  f"{s['slope_tolerance']:g} of {s['target_slope']:g} ({draws} draws, n = {sizes[0]}..{sizes[-1]})",
                  gap <= s["slope_tolerance"])
    fig, axes = plotting.panel_grid(len(powers))
    for ax, k in zip(axes, powers):
        ax.loglog(sizes, spread[k], "o", color="tab:red", label=f"std over {draws} unit vectors")
        ax.loglog(sizes, exact[k], "k-", lw=0.8, label="exact: sqrt(2 (m_2k - m_k^2) / (n + 2))")
        slope, intercept = T.loglog_slope(sizes, spread[k])
        ax.loglog(sizes, np.exp(intercept) * np.asarray(sizes, dtype=float) ** slope, "--",
                  color="tab:red", lw=0.8, label=f"fit: slope {slope:.3f}")
        ax.set(xlabel="n", ylabel=f"std of u^T A^{k} u",
               title=f"Lemma 1, {s['dataset']['name'].replace('_', ' ')}, k = {k}")
        ax.legend(fontsize=6, loc="lower left")
    _tidy(fig)
    run.figure(fig, "lemma1")


def _tidy(fig) -> None:
    for ax in fig.axes:
        ax.title.set_fontsize(9)
    fig.tight_layout()
