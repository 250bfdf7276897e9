"""``analysis=laplace``: linearised-Laplace predictive variances of a network's logits on test inputs.

    python -m experiments.run analysis=laplace dataset=digits model=cnn
    # CPU: trains the CNN 3 epochs (Adam), last-layer Laplace (fc: 5,130 weights) over 1,437 digits, 20 test inputs.

The posterior precision is ``Lambda = N G + lambda I``: ``G`` the GGN of the *mean* cross-entropy over the
``N`` training samples (:class:`curvature.operators.GGNOperator`, bn_mode eval), so ``N G`` is the GGN of the
summed loss, the negative log-likelihood of the data; ``lambda = analysis.prior_precision``. For a test input
``x`` with logits ``mu(x)`` and Jacobian rows ``J_c(x)`` (in the Laplace weights, by ``torch.func.jacrev``) the
linearised predictive has covariance ``Sigma(x) = J(x) Lambda^{-1} J(x)^T`` (C x C), so ``var_c(x) =
J_c(x) Lambda^{-1} J_c(x)^T``. ``Lambda^{-1} J^T`` comes from conjugate gradients (:func:`curvature.solve.solve`)
on ``(G + (lambda / N) I) u = J^T / N`` (the same system divided by N), all test inputs' rows as the columns of
one solve. Predictives: probit, ``p = softmax(mu_c / sqrt(1 + pi var_c / 8))``; Monte-Carlo, the mean softmax
of ``analysis.mc_samples`` draws from ``N(mu(x), Sigma(x))``. Checks: CG converged; every variance is at most
the prior's ``||J_c||^2 / lambda`` (the precision is at least ``lambda I``); and, when the Laplace weights
number at most ``analysis.dense_max_dim``, the variances equal those of the dense GGN (:func:`curvature.dense.
dense_ggn`) inverted densely. With ``analysis.checkpoint=null`` the network is first trained here for
``analysis.train_epochs`` epochs (Adam), as the approximation is about a trained network.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from omegaconf import DictConfig
from torch.func import functional_call, jacrev, vmap

from curvature import plotting
from curvature.dense import dense_ggn
from curvature.functional import curvature_mode, select_parameters
from curvature.operators import make_operator
from curvature.solve import solve
from curvature.training import train_epoch
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import (build_network, checkpoint_path, load_data, validate_image_dataset,
                                  validate_model)
from experiments.runtime import Run
from experiments.spectrum_network import has_batch_norm, validate_operator


def validate(cfg: DictConfig) -> dict:
    o = validate_operator(cfg)
    if o["loss"] != "cross_entropy" or o["reduction"] != "mean" or o["label_smoothing"]:
        raise V.ConfigError("operator.loss", o["loss"], "the Laplace predictive here is the softmax likelihood: "
                            "plain mean cross-entropy", "operator.loss=cross_entropy")
    return {"dataset": validate_image_dataset(cfg), "model": validate_model(cfg), "operator": o,
            "prior_precision": V.positive_number(cfg, "analysis.prior_precision", "analysis.prior_precision=1.0"),
            "num_test": V.positive_int(cfg, "analysis.num_test", "analysis.num_test=20"),
            "select": V.choice(cfg, "analysis.select", ["balanced", "first"]),
            "weights": V.choice(cfg, "analysis.weights", ["last_layer", "all"]),
            "tol": V.positive_number(cfg, "analysis.tol", "analysis.tol=1e-4"),
            "max_iter": V.positive_int(cfg, "analysis.max_iter", "analysis.max_iter=500"),
            "mc_samples": V.positive_int(cfg, "analysis.mc_samples", "analysis.mc_samples=1000"),
            "checkpoint": checkpoint_path(cfg, "analysis.checkpoint"),
            "train_epochs": V.integer(cfg, "analysis.train_epochs", minimum=0, example="analysis.train_epochs=5"),
            "train_lr": V.positive_number(cfg, "analysis.train_lr", "analysis.train_lr=0.003"),
            "train_batch_size": V.positive_int(cfg, "analysis.train_batch_size", "analysis.train_batch_size=64"),
            "dense_max_dim": V.integer(cfg, "analysis.dense_max_dim", minimum=0, example="analysis.dense_max_dim=2500"),
            "dense_tolerance": V.positive_number(cfg, "analysis.dense_tolerance", "analysis.dense_tolerance=1e-3")}


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "laplace", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        splits = load_data(s["dataset"], run.device, run.seed)
        model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
        _train_if_asked(run, s, model, splits)
        names = laplace_weights(model, s, o)
        if o["names"] != ["ggn"]:
            run.note(f"the posterior precision is the GGN's (operator={','.join(o['names'])} gives only the loss "
                     "and product settings)")
        if has_batch_norm(model):
            run.note("BatchNorm with running statistics (bn_mode eval): a test prediction depends on no batch")
        batches = list(splits.train.batches(o["batch_size"], dtype=run.dtype))
        n = len(splits.train)
        loss_fn = build_loss(o)
        ggn = make_operator("ggn", model, loss_fn, batches, bn_mode="eval", params=names,
                            check_deterministic=o["check_deterministic"], cache=o["cache"], layerwise=o["layerwise"])
        inputs, labels, index = _test_inputs(run, s, model, splits)
        mu, jac = jacobian_rows(model, names, inputs)                       # (T, C), (T, C, P)
        t, c, p = jac.shape
        start = time.perf_counter()
        result = solve(ggn, jac.reshape(t * c, p).T / n, damping=s["prior_precision"] / n, tol=s["tol"],
                       max_iter=s["max_iter"], method="cg")
        seconds = time.perf_counter() - start
        covariance = torch.einsum("tcp,ptd->tcd", jac, result.x.reshape(p, t, c))
        covariance = 0.5 * (covariance + covariance.transpose(1, 2))
        variance = torch.diagonal(covariance, dim1=1, dim2=2)
        run.metric("num_laplace_weights", p)
        run.metric("num_train", n)
        run.metric("cg_iterations", result.iterations)
        run.metric("cg_matvecs", result.num_matvecs)
        run.metric("cg_seconds", seconds)
        run.metric("cg_seconds_per_product", ggn.product_seconds / max(ggn.num_products, 1))
        for note in result.notes:
            run.note(f"CG: {note}")
        worst = max(result.residual_norm)
        run.check("cg_converged", worst, f"CG reached tol={s['tol']:g} in every column and the true relative "
                  "residuals are <= 10 tol", result.converged and worst <= 10 * s["tol"])
        prior = (jac ** 2).sum(-1) / s["prior_precision"]
        ratio = float((variance / prior).max())
        run.check("posterior_below_prior", ratio, "max_c var_c / (||J_c||^2 / prior) <= 1 (precision >= prior I)",
                  ratio <= 1 + 1e-8)
        _dense_check(run, s, model, loss_fn, batches, names, inputs, jac, variance, n, ggn)
        summary = _predictives(run, s, mu, covariance, variance, labels)
        for key in ("mu", "variance", "covariance", "labels", "index"):
            run.array(key, {"mu": mu, "variance": variance, "covariance": covariance, "labels": labels,
                            "index": index}[key])
        run.figure(_draw(s, summary, p, n), "laplace")
        return run.finish(laplace={"precision": "N * mean GGN + prior_precision * I (N G: the GGN of the summed "
                                                "loss over the training set)",
                                   "num_train": n, "prior_precision": s["prior_precision"], "weights": names,
                                   "num_weights": p, "select": s["select"], "tol": s["tol"],
                                   "probit": "softmax(mu_c / sqrt(1 + pi var_c / 8))",
                                   "mc_samples": s["mc_samples"]},
                          operator=o, checkpoint=s["checkpoint"])


def laplace_weights(model, s: dict, o: dict) -> list[str]:
    """The parameter names the posterior is over: operator.params, else all or the last module's."""
    if o["params"] is not None or s["weights"] == "all":
        return select_parameters(model, o["params"])
    owners = [name for name, m in model.named_modules()
              if any(q.requires_grad for q in m.parameters(recurse=False))]
    last = owners[-1]
    return [f"{last}.{k}" if last else k for k, q in model.get_submodule(last).named_parameters(recurse=False)
            if q.requires_grad]


def jacobian_rows(model, names: list[str], inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, C) and their Jacobian (T, C, P) in the parameters ``names`` (flat, in that order)."""
    named = dict(model.named_parameters())
    fixed = {k: q.detach() for k, q in named.items() if k not in set(names)}
    fixed.update(dict(model.named_buffers()))
    selected = {k: named[k].detach() for k in names}

    def logits(weights, x):
        out = functional_call(model, {**fixed, **weights}, (x.unsqueeze(0),))[0]
        return out, out

    with curvature_mode(model, "eval"):
        jac, mu = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))(selected, inputs)
    t, c = mu.shape
    return mu.detach(), torch.cat([jac[k].reshape(t, c, -1) for k in names], dim=2).detach()


def _train_if_asked(run: Run, s: dict, model, splits) -> None:
    if s["checkpoint"] is not None or s["train_epochs"] == 0:
        run.note(f"weights: {s['checkpoint'] or 'initial (seed ' + str(run.seed) + ')'}")
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=s["train_lr"])
    generator = torch.Generator(device=run.device).manual_seed(run.seed)
    start = time.perf_counter()
    for epoch in range(s["train_epochs"]):
        stats = train_epoch(model, splits.train, optimizer, s["train_batch_size"], generator, augment=False,
                            dtype=run.dtype, epoch=epoch, progress=False)
    run.metric("train_seconds", time.perf_counter() - start)
    run.metric("train_loss", stats["loss"])
    run.note(f"weights: trained here, {s['train_epochs']} epochs of Adam (lr {s['train_lr']:g}, batch "
             f"{s['train_batch_size']}) from the initial weights (seed {run.seed}): train loss {stats['loss']:.3g}")


@torch.no_grad()
def _test_inputs(run: Run, s: dict, model, splits):
    """``num_test`` test inputs, their labels and indices in the test split (see ``analysis.select``)."""
    images, labels = next(splits.test.batches(len(splits.test), dtype=run.dtype))
    with curvature_mode(model, "eval"):
        wrong = model(images).argmax(-1) != labels
    k = min(s["num_test"], len(labels))
    if s["select"] == "first":
        index = torch.arange(k, device=labels.device)
    else:
        bad, good = wrong.nonzero().flatten(), (~wrong).nonzero().flatten()
        take = min(len(bad), k // 2)
        index = torch.cat([bad[:take], good[:k - take]]).sort().values
    run.metric("map_test_accuracy", float(1 - wrong.double().mean()))
    run.note(f"test inputs: {len(index)} of {len(labels)} ({s['select']}: {int(wrong[index].sum())} that the "
             f"MAP gets wrong)")
    return images[index], labels[index], index


def _dense_check(run: Run, s: dict, model, loss_fn, batches, names, inputs, jac, variance, n: int, ggn) -> None:
    """CG variances against a dense solve: of the Laplace itself when it is small enough, else of the
    Laplace over its last parameter tensors that fit ``dense_max_dim`` (the same data, solver and scaling)."""
    p = jac.shape[-1]
    if p > s["dense_max_dim"]:
        sizes = dict(zip(ggn.names, ggn.sizes))
        small, total = [], 0
        for name in reversed(names):
            if total + sizes[name] > s["dense_max_dim"]:
                break
            small, total = [name] + small, total + sizes[name]
        if not small:
            run.note(f"no dense check: every parameter tensor has more than analysis.dense_max_dim="
                     f"{s['dense_max_dim']} entries")
            return
        run.note(f"dense check on the Laplace over {', '.join(small)} ({total} weights; the full one has {p} > "
                 f"analysis.dense_max_dim={s['dense_max_dim']})")
        sub = make_operator("ggn", model, loss_fn, batches, bn_mode="eval", params=small, check_deterministic=False,
                            check_layerwise=False, layerwise=False)
        jac = jacobian_rows(model, small, inputs)[1]
        t, c, _ = jac.shape
        x = solve(sub, jac.reshape(t * c, total).T / n, damping=s["prior_precision"] / n, tol=s["tol"],
                  max_iter=s["max_iter"], method="cg").x
        variance = torch.einsum("tcp,ptc->tc", jac, x.reshape(total, t, c))
        names, p = small, total
    g = dense_ggn(model, loss_fn, batches, "eval", params=names).to(torch.float64)
    precision = n * g + s["prior_precision"] * torch.eye(p, dtype=torch.float64, device=g.device)
    rows = jac.to(torch.float64).reshape(-1, p)
    dense = (rows * torch.linalg.solve(precision, rows.T).T).sum(-1).reshape(variance.shape)
    error = float((variance.to(torch.float64) - dense).abs().max() / dense.abs().max())
    run.check("dense_variances", error, f"max |var_CG - var_dense| / max var_dense <= {s['dense_tolerance']:g}",
              error <= s["dense_tolerance"])


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp(min=1e-300).log()).sum(-1)


def _predictives(run: Run, s: dict, mu, covariance, variance, labels) -> dict:
    """MAP, probit and Monte-Carlo predictives on the test inputs; metrics and what the figure draws."""
    map_probs = torch.softmax(mu, -1)
    probit = torch.softmax(mu / torch.sqrt(1 + math.pi * variance / 8), -1)
    gen = torch.Generator().manual_seed(run.seed)
    c = mu.shape[1]
    jitter = 1e-10 * covariance.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-30)
    chol = torch.linalg.cholesky(covariance.double().cpu() + jitter.cpu() * torch.eye(c, dtype=torch.float64))
    noise = torch.randn(s["mc_samples"], *mu.shape, generator=gen, dtype=torch.float64)
    draws = mu.double().cpu() + torch.einsum("tcd,std->stc", chol, noise)
    mc = torch.softmax(draws, -1).mean(0).to(mu.device, mu.dtype)
    predicted = mu.argmax(-1)
    wrong = predicted != labels
    std = variance.gather(1, predicted[:, None]).squeeze(1).clamp(min=0).sqrt()
    for name, probs in (("map", map_probs), ("probit", probit), ("mc", mc)):
        run.metric(f"{name}_nll", float(-probs.gather(1, labels[:, None]).clamp(min=1e-300).log().mean()))
        run.metric(f"{name}_mean_entropy", float(_entropy(probs).mean()))
    mean_wrong = float(std[wrong].mean()) if wrong.any() else float("nan")
    mean_right = float(std[~wrong].mean()) if (~wrong).any() else float("nan")
    run.metric("num_wrong", int(wrong.sum()))
    run.metric("std_predicted_logit_wrong", mean_wrong)
    run.metric("std_predicted_logit_right", mean_right)
    run.metric("std_ratio_wrong_to_right", mean_wrong / mean_right if mean_right else float("nan"))
    run.array("probit_probs", probit)
    run.array("mc_probs", mc)
    run.array("std_predicted_logit", std)
    return {"std": std.cpu().numpy(), "wrong": wrong.cpu().numpy(), "entropy_map": _entropy(map_probs).cpu().numpy(),
            "entropy_mc": _entropy(mc).cpu().numpy(), "mean_wrong": mean_wrong, "mean_right": mean_right}


def _draw(s: dict, summary: dict, p: int, n: int):
    fig, (left, right) = plotting.panel_grid(2, width=3.8, height=3.2)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, size=len(summary["std"]))
    wrong = summary["wrong"]
    for ax, values, label in ((left, summary["std"], "predictive std of the predicted logit"),
                              (right, summary["entropy_mc"], "predictive entropy (Laplace MC)")):
        for group, colour, name in ((0, "tab:blue", "right"), (1, "tab:red", "wrong")):
            chosen = wrong == bool(group)
            ax.scatter(group + jitter[chosen], values[chosen], s=14, color=colour, alpha=0.8,
                       label=f"{name} ({int(chosen.sum())})")
            if chosen.any():
                ax.hlines(values[chosen].mean(), group - 0.25, group + 0.25, color=colour)
        ax.set_xticks([0, 1], ["right", "wrong"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel(label)
    right.scatter(wrong.astype(float) + 0.3, summary["entropy_map"], s=8, marker="x", color="grey", label="MAP")
    right.legend(fontsize=7)
    left.set_title(f"std wrong {summary['mean_wrong']:.3g} vs right {summary['mean_right']:.3g}\n"
                   f"Laplace over {p} weights, N={n}, prior {s['prior_precision']:g}", fontsize=9)
    right.set_title("entropy: Laplace MC (dots) vs MAP (x)", fontsize=9)
    fig.tight_layout()
    return fig
