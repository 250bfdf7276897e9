"""``analysis=kernel_smoothing``: Thm. 5 - Gaussian kernel smoothing biases the moments.

For each spectrum (the exact eigenvalues and the Lanczos stems of the matrix dataset, or the stems
saved by ``analysis=spectrum`` in ``analysis.spectrum_file``, e.g. of a network) and each bandwidth
sigma (a standard deviation in eigenvalue units; bandwidths in the PyHessian / spectral-density
"variance scaled by the spectral range" convention are converted), it

* measures the raw moments ``k = 0..max_moment`` of the smoothed density by quadrature of
  :meth:`SpectralMeasure.smooth` and compares their change with Thm. 5's closed form
  (:func:`curvature.theory.smoothed_moment`: ``m_2 + sigma^2``, ``m_4 + 6 sigma^2 m_2 + 3 sigma^4``...),
  the error normalised by ``s^k``, ``s = max(max |node|, sigma)``;
* reports how much of the mass at zero stays within ``zero_window x`` the spectral width of 0;
* draws the smoothed densities (log scale: the outliers; zoomed, linear: the atom at zero) and the
  moment biases against sigma.

    python -m experiments.run experiment=thm5
    python -m experiments.run experiment=thm5 analysis.spectrum_file=outputs/<run>/arrays.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from curvature import plotting
from curvature import theory as T
from curvature.lanczos import lanczos
from curvature.spectrum import SpectralMeasure, sigma_from_scaled_variance
from experiments import validate as V
from experiments.matrices import build_matrix, validate_matrix_dataset
from experiments.runtime import Run


def _optional_positive_list(cfg, key: str, example: str) -> list[float]:
    value = V.get(cfg, key, None)
    if value is None or value == []:
        return []
    return V.number_list(cfg, key, 0.0, strict=True, example=example)


def validate(cfg: DictConfig) -> dict:
    path = V.get(cfg, "analysis.spectrum_file", None)
    s = {
        "spectrum_file": None if path is None else _spectrum_path(path),
        "saved_spectra": None if path is None else load_spectrum_file(_spectrum_path(path)),
        "sigmas": _optional_positive_list(cfg, "analysis.sigmas", "analysis.sigmas=[0.1,0.5,1.0]"),
        "scaled_variances": _optional_positive_list(cfg, "analysis.scaled_variances",
                                                    "analysis.scaled_variances=[1e-5]"),
        "max_moment": V.integer(cfg, "analysis.max_moment", 1, 12, "analysis.max_moment=6"),
        "tolerance": V.positive_number(cfg, "analysis.tolerance", "analysis.tolerance=1e-6"),
        "zero_window": V.positive_number(cfg, "analysis.zero_window", "analysis.zero_window=1e-3"),
        "points_per_sigma": V.number(cfg, "analysis.points_per_sigma", minimum=1.0,
                                     example="analysis.points_per_sigma=4"),
        "plot_points": V.integer(cfg, "analysis.plot_points", 10, None, "analysis.plot_points=2000"),
    }
    if not s["sigmas"] and not s["scaled_variances"]:
        raise V.ConfigError("analysis.sigmas", [], "give at least one bandwidth (or analysis.scaled_variances)",
                            "analysis.sigmas=[0.1,0.5,1.0]")
    if s["spectrum_file"] is None:  # the matrix dataset; a saved spectrum needs no dataset
        s["dataset"] = validate_matrix_dataset(cfg)
        s["num_steps"] = V.integer(cfg, "analysis.num_steps", 1, s["dataset"]["n"], "analysis.num_steps=30")
        s["num_vectors"] = V.positive_int(cfg, "analysis.num_vectors", "analysis.num_vectors=1")
        s["exact_max_dim"] = V.integer(cfg, "analysis.exact_max_dim", minimum=0,
                                       example="analysis.exact_max_dim=4000")
    return s


# --- the spectra -------------------------------------------------------------------------------
def _spectrum_path(value) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / "arrays.npz"
    if not path.is_file():
        raise V.ConfigError("analysis.spectrum_file", str(value), "no such file (expected the arrays.npz "
                            "of an analysis=spectrum run, or its run folder)",
                            "analysis.spectrum_file=outputs/<run>/arrays.npz")
    return path


def load_spectrum_file(path: Path) -> dict[str, SpectralMeasure]:
    """Measures from an ``arrays.npz`` of ``analysis=spectrum``.

    Every ``<prefix>ritz_values`` with its ``<prefix>ritz_weights`` and ``<prefix>mask`` (k, m) gives
    the measure ``<prefix>lanczos``, averaged over the k start vectors, and ``<prefix>exact_eigenvalues``
    when saved gives ``<prefix>exact``. The prefix is empty for a matrix run and the operator's name
    (``hessian_``, ``ggn_``) for a network run, which may hold several operators.
    """
    try:
        with np.load(path) as arrays:
            data = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    except Exception as error:  # a truncated or foreign file: say which and why, on one line
        raise V.ConfigError("analysis.spectrum_file", str(path), f"cannot be read as .npz "
                            f"({type(error).__name__})", "analysis.spectrum_file=outputs/<run>/arrays.npz") from None
    prefixes = sorted(k[:-len("ritz_values")] for k in data
                      if k.endswith("ritz_values") and k[:-len("ritz_values")] + "ritz_weights" in data)
    if not prefixes:
        raise V.ConfigError("analysis.spectrum_file", str(path), "holds no ritz_values / ritz_weights "
                            f"(it has: {', '.join(sorted(data)) or 'nothing'})", "a file written by analysis=spectrum")
    measures = {}
    for prefix in prefixes:
        values = data[prefix + "ritz_values"].to(torch.float64)
        values = values.reshape(-1, values.shape[-1])
        weights = data[prefix + "ritz_weights"].to(torch.float64).reshape(values.shape)
        mask = data[prefix + "mask"].reshape(values.shape).bool() if prefix + "mask" in data \
            else torch.ones_like(values, dtype=torch.bool)
        measures[prefix + "lanczos"] = SpectralMeasure.average(
            [SpectralMeasure(values[i][mask[i]], weights[i][mask[i]]) for i in range(values.shape[0])])
        if prefix + "exact_eigenvalues" in data:
            measures[prefix + "exact"] = SpectralMeasure.from_eigenvalues(data[prefix + "exact_eigenvalues"])
    return measures


def _matrix_spectra(run: Run, s: dict) -> dict[str, SpectralMeasure]:
    problem = build_matrix(s["dataset"], run.dtype, run.device)
    matrix = problem.matrix
    measures = {}
    exact = problem.eigenvalues
    if exact is None and problem.dim <= s["exact_max_dim"]:
        exact = torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu()
    if exact is not None:
        measures["exact"] = SpectralMeasure.from_eigenvalues(exact)
    result = lanczos(lambda x: matrix @ x, problem.dim, s["num_steps"], num_vectors=s["num_vectors"],
                     seed=run.seed, dtype=run.dtype, device=run.device)
    for note in result.notes:
        run.note(note)
    measures["lanczos"] = SpectralMeasure.from_lanczos(result)
    return measures


def _bandwidths(s: dict, measure: SpectralMeasure) -> list[dict]:
    """Every bandwidth of the sweep as (sigma, scaled variance, the convention it was given in)."""
    low, high = float(measure.nodes.min()), float(measure.nodes.max())
    given = [(sigma, "std") for sigma in s["sigmas"]] + \
        [(sigma_from_scaled_variance(v, low, high), "scaled_variance") for v in s["scaled_variances"]]
    return sorted(({"sigma": sigma, "scaled_variance": T.scaled_variance_from_sigma(sigma, low, high),
                    "given_as": kind} for sigma, kind in given), key=lambda b: b["sigma"])


# --- the analysis -------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict:
    with Run(cfg, "kernel_smoothing", validate=validate) as run:
        s = run.settings
        if s["saved_spectra"] is not None:
            spectra = s["saved_spectra"]
            run.note(f"spectra read from {s['spectrum_file']}; the dataset group is not used")
        else:
            spectra = _matrix_spectra(run, s)
        sweeps = {name: _sweep(run, s, name, measure) for name, measure in spectra.items()}
        run.figure(_draw_densities(s, spectra, sweeps), "kernel_smoothing")
        run.figure(_draw_biases(s, sweeps), "moment_bias")
        return run.finish(spectra=sorted(spectra),
                          spectrum_file=None if s["spectrum_file"] is None else str(s["spectrum_file"]))


def _sweep(run: Run, s: dict, name: str, measure: SpectralMeasure) -> dict:
    """Measure Thm. 5 for one spectrum over the bandwidth sweep; return its bands and moments."""
    k_max = s["max_moment"]
    exact = measure.moments(k_max)
    radius = float(measure.nodes.abs().max())
    window = s["zero_window"] * float(measure.nodes.max() - measure.nodes.min())
    bands, rows = _bandwidths(s, measure), []
    run.metric(f"{name}_zero_mass", measure.mass_near(0.0, window))
    run.array(f"{name}_nodes", measure.nodes)
    run.array(f"{name}_weights", measure.weights)
    for i, band in enumerate(bands):
        sigma = band["sigma"]
        try:
            measured = T.smoothed_density_moments(measure, sigma, k_max, s["points_per_sigma"])
        except ValueError as error:
            raise V.ConfigError("analysis.sigmas", sigma, str(error), "analysis.sigmas=[0.1,0.5,1.0]") from None
        scale = max(radius, sigma)
        for k in range(k_max + 1):
            formula = T.smoothing_moment_bias(exact, k, sigma)
            rows.append({"spectrum": name, "sigma": sigma, "k": k, "moment": exact[k],
                         "smoothed_moment": measured[k], "bias": measured[k] - exact[k],
                         "bias_formula": formula,
                         "normalised_error": abs(measured[k] - exact[k] - formula) / scale ** k})
        band["measured_bias"] = [measured[k] - exact[k] for k in range(k_max + 1)]
        band["zero_mass"] = T.smoothed_mass(measure, sigma, -window, window)
        for key in ("sigma", "scaled_variance", "zero_mass"):
            run.metric(f"{name}_{key}_{i}", band[key])
    worst = max(row["normalised_error"] for row in rows)
    run.table(f"{name}_bandwidths", [{k: b[k] for k in ("sigma", "scaled_variance", "given_as", "zero_mass")}
                                     for b in bands])
    run.table(f"{name}_moments", rows)
    run.metric(f"{name}_thm5_max_error", worst)
    run.check(f"thm5_{name}", worst, f"|measured - formula bias of m_k| / s^k <= {s['tolerance']:g} for "
              f"k = 0..{k_max} and every sigma (s = max(max |node|, sigma))", worst <= s["tolerance"])
    return {"bands": bands, "moments": exact}


def _draw_densities(s: dict, spectra: dict, sweeps: dict):
    import matplotlib.pyplot as plt
    names = sorted(spectra)
    fig, axes = plt.subplots(2, len(names), figsize=(4.4 * len(names), 5.8), squeeze=False)
    for col, name in enumerate(names):
        measure, bands = spectra[name], sweeps[name]["bands"]
        low, high = float(measure.nodes.min()), float(measure.nodes.max())
        pad = 4 * bands[-1]["sigma"]
        # about 2 points per smallest sigma (at most 8000), or the narrowest curve aliases on the grid
        points = min(max(s["plot_points"], int(2 * (high - low + 2 * pad) / bands[0]["sigma"])), 8_000)
        x = torch.linspace(low - pad, high + pad, points, dtype=torch.float64)
        half = 0.1 * max(high - low, 1e-12)
        zoom = torch.linspace(-half, half, s["plot_points"], dtype=torch.float64)
        top = 0.0
        for band in bands:
            label = f"sigma={band['sigma']:.3g} (v={band['scaled_variance']:.2g})"
            density = T.smoothed_density(measure, x, band["sigma"])
            top = max(top, float(density.max()))
            axes[0, col].semilogy(x.numpy(), density.numpy(), lw=0.9, label=label)
            axes[1, col].plot(zoom.numpy(), T.smoothed_density(measure, zoom, band["sigma"]).numpy(), lw=0.9,
                              label=label)
        axes[0, col].plot(measure.nodes.numpy(), np.full(measure.nodes.numel(), 3e-5 * top), "|",
                          color="k", ms=8, label="nodes")
        axes[0, col].set_ylim(1e-5 * top, 2 * top)
        axes[0, col].set(xlabel="eigenvalue", ylabel="smoothed density (log)",
                         title=f"{name}: Gaussian kernel, std sigma (v: scaled-variance convention)")
        zero = measure.mass_near(0.0, s["zero_window"] * (high - low))
        axes[1, col].set(xlabel="eigenvalue", ylabel="smoothed density",
                         title=f"{name}, near 0: the mass {zero:.2f} at 0 smeared out")
        for ax in axes[:, col]:
            ax.legend(fontsize=6)
            ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig


def _draw_biases(s: dict, sweeps: dict):
    names = sorted(sweeps)
    fig, axes = plotting.panel_grid(len(names))
    for ax, name in zip(axes, names):
        bands, moments = sweeps[name]["bands"], sweeps[name]["moments"]
        sigma = np.array([b["sigma"] for b in bands])
        fine = np.geomspace(sigma.min() / 2, sigma.max() * 2, 100)
        for k in range(2, s["max_moment"] + 1, 2):  # even k: the bias is positive
            line, = ax.loglog(sigma, [b["measured_bias"][k] for b in bands], "o", ms=4,
                              label=f"measured, k={k}")
            ax.loglog(fine, [T.smoothing_moment_bias(moments, k, f) for f in fine], "-", lw=0.8,
                      color=line.get_color(), label=f"Thm. 5, k={k}")
        ax.set(xlabel="sigma (std, eigenvalue units)", ylabel="m_k(smoothed) - m_k",
               title=f"{name}: moment bias vs bandwidth")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
