"""Drawing helpers shared by the analyses and ``paper_figures/``: stems, histograms, densities.

They only draw what they are given; nothing here computes a spectrum.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def stem(ax, nodes, weights, title: str | None = None, color: str = "tab:red") -> None:
    """Stem plot of a discrete spectral measure: one stem per node, height = weight."""
    nodes, weights = np.asarray(nodes, dtype=float), np.asarray(weights, dtype=float)
    keep = weights > 0
    markerline, stemlines, baseline = ax.stem(nodes[keep], weights[keep], basefmt=" ")
    plt.setp(stemlines, color=color, linewidth=1.2)
    plt.setp(markerline, color=color, markersize=3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("weight")
    if title:
        ax.set_title(title, fontsize=9)


def histogram(ax, values=None, bins: int = 60, value_range=None, density_curve=None, atom=None,
              title: str | None = None, color: str = "tab:blue", label: str | None = None,
              edges=None, heights=None) -> None:
    """Density histogram of values (or of precomputed ``edges``/``heights``), with an optional
    analytic density curve ``(x, y)`` and an atom ``(position, mass)`` drawn as an arrow-less stem."""
    if edges is None:
        heights, edges = np.histogram(np.asarray(values, dtype=float), bins=bins, range=value_range,
                                      density=True)
    ax.bar(edges[:-1], heights, width=np.diff(edges), align="edge", color=color, alpha=0.6,
           label=label or "histogram")
    if density_curve is not None:
        ax.plot(np.asarray(density_curve[0]), np.asarray(density_curve[1]), color="k", lw=1.2,
                label="analytic density")
    if atom is not None and atom[1] > 0:
        ax.annotate(f"atom at {atom[0]:g}: mass {atom[1]:.2f}", xy=(atom[0], 0), xycoords="data",
                    xytext=(0.3, 0.6), textcoords="axes fraction", fontsize=7,
                    arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def panel_grid(num_panels: int, width: float = 3.4, height: float = 2.8, columns: int | None = None):
    """A row (or 2 x 2 for four panels, as in the paper) of axes; ``columns``: rows of that many."""
    if columns is not None:
        rows = -(-num_panels // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
        return fig, list(axes.flat)
    if num_panels == 4:
        fig, axes = plt.subplots(2, 2, figsize=(2 * width, 2 * height))
        return fig, list(axes.flat)
    fig, axes = plt.subplots(1, num_panels, figsize=(width * num_panels, height), squeeze=False)
    return fig, list(axes.flat)


def stem_heatmap(ax, positions, measures, bins: int = 60, xlabel: str = "epoch", title: str | None = None) -> None:
    """Discrete spectral measures side by side: column ``j`` (centred on ``positions[j]``) holds the
    stem weight of ``measures[j]`` (a ``(nodes, weights)`` pair) in each of ``bins`` eigenvalue bins
    spanning every measure's nodes; log colour, empty bins blank."""
    from matplotlib.colors import LogNorm

    pairs = [(np.asarray(n, dtype=float), np.asarray(w, dtype=float)) for n, w in measures]
    pairs = [(n[w > 0], w[w > 0]) for n, w in pairs]
    low = min(n.min() for n, _ in pairs)
    high = max(n.max() for n, _ in pairs)
    pad = 0.01 * (high - low or abs(high) or 1.0)
    edges = np.linspace(low - pad, high + pad, bins + 1)
    grid = np.stack([np.histogram(n, bins=edges, weights=w)[0] for n, w in pairs], axis=1)
    x = np.asarray(positions, dtype=float)
    half = np.diff(x) / 2 if x.size > 1 else np.array([0.5])
    x_edges = np.concatenate([[x[0] - half[0]], x[:-1] + half, [x[-1] + half[-1]]])
    shown = np.ma.masked_less_equal(grid, 0)
    mesh = ax.pcolormesh(x_edges, edges, shown, cmap="viridis", shading="flat",
                         norm=LogNorm(vmin=shown.min(), vmax=max(shown.max(), shown.min() * 1.0001)))
    ax.figure.colorbar(mesh, ax=ax, label="stem weight")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eigenvalue")
    if title:
        ax.set_title(title, fontsize=9)


def series(ax, x, y, xlabel: str = "epoch", ylabel: str = "", title: str | None = None,
           color: str = "tab:red", label: str | None = None) -> None:
    """One quantity over training: markers joined by a line (integer ticks when ``x`` is integral)."""
    from matplotlib.ticker import MaxNLocator

    x = np.asarray(x, dtype=float)
    ax.plot(x, np.asarray(y, dtype=float), marker="o", markersize=3, color=color, label=label)
    if np.all(x == np.round(x)):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if label:
        ax.legend(fontsize=7)


def cdf(ax, measure, per_vector=(), exact=None, title: str | None = None, points: int = 400) -> None:
    """The Lanczos measure's CDF (a step at each Ritz value), the 95% Student-t band of the per-vector
    CDFs when there are two or more start vectors, and the exact eigenvalues' empirical CDF: one
    probability scale for all three."""
    from scipy import stats

    nodes = np.asarray(measure.nodes, dtype=float)
    weights = np.asarray(measure.weights, dtype=float)
    values = [nodes] + ([np.asarray(exact, dtype=float)] if exact is not None else [])
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    pad = 0.02 * (high - low or 1.0)
    grid = np.linspace(low - pad, high + pad, points)

    def curve(x, w):
        order = np.argsort(x)
        return np.concatenate([[0.0], np.cumsum(w[order])])[np.searchsorted(x[order], grid, side="right")]

    if exact is not None:
        e = np.asarray(exact, dtype=float)
        ax.plot(grid, curve(e, np.full(e.size, 1.0 / e.size)), color="black", lw=1.2, label="exact eigenvalues")
    k = len(per_vector)
    ax.plot(grid, curve(nodes, weights), color="tab:red", lw=1.2,
            label=f"Lanczos (mean over {k} vectors)" if k >= 2 else "Lanczos (one vector: no band)")
    if k >= 2:
        each = np.stack([curve(np.asarray(m.nodes, dtype=float), np.asarray(m.weights, dtype=float))
                         for m in per_vector])
        half = stats.t.ppf(0.975, k - 1) * each.std(axis=0, ddof=1) / np.sqrt(k)
        mean = each.mean(axis=0)
        ax.fill_between(grid, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), color="tab:red",
                        alpha=0.25, lw=0, label=f"95% band over {k} vectors")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("cumulative weight")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
