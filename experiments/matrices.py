"""The synthetic matrix datasets (``dataset=wigner | marchenko_pastur | synthetic_spectrum``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from omegaconf import DictConfig

from curvature import random_matrices as rm
from experiments import validate as V

MATRIX_DATASETS = ("wigner", "marchenko_pastur", "synthetic_spectrum")


@dataclass
class MatrixProblem:
    """A dense symmetric matrix with what is known of its spectrum in closed form."""

    name: str
    matrix: torch.Tensor
    edges: Optional[tuple[float, float]] = None            # analytic support of the limiting law
    density: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # its continuous part
    atom_at_zero: float = 0.0                               # analytic mass at exactly 0
    eigenvalues: Optional[torch.Tensor] = None              # known by construction (synthetic)
    params: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]


def validate_matrix_dataset(cfg: DictConfig) -> dict:
    """Check the dataset keys of a matrix dataset; return them as plain values."""
    name = V.choice(cfg, "dataset.name", MATRIX_DATASETS, "dataset=wigner")
    params = {"n": V.positive_int(cfg, "dataset.n", "dataset.n=1000"),
              "seed": V.integer(cfg, "dataset.seed", minimum=0, example="dataset.seed=0")}
    if name == "wigner":
        params["std"] = V.positive_number(cfg, "dataset.std", "dataset.std=1.0")
    elif name == "marchenko_pastur":
        params["ratio"] = V.positive_number(cfg, "dataset.ratio", "dataset.ratio=0.5")
    else:
        params["zero_fraction"] = V.number(cfg, "dataset.zero_fraction", 0.0, 1.0,
                                           example="dataset.zero_fraction=0.5")
        params["bulk_low"] = V.number(cfg, "dataset.bulk_low")
        params["bulk_high"] = V.number(cfg, "dataset.bulk_high", minimum=params["bulk_low"],
                                       example="dataset.bulk_high=5.0")
        params["bulk_shape"] = V.choice(cfg, "dataset.bulk_shape", ["uniform", "skewed"])
        for sign in ("positive", "negative"):
            params[f"num_{sign}_outliers"] = V.integer(cfg, f"dataset.num_{sign}_outliers", minimum=0,
                                                       example=f"dataset.num_{sign}_outliers=3")
            rng = V.get(cfg, f"dataset.{sign}_outlier_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, (int, float))
                                                                   for x in rng) and rng[0] <= rng[1]):
                raise V.ConfigError(f"dataset.{sign}_outlier_range", rng, "must be [low, high], low <= high",
                                    f"dataset.{sign}_outlier_range=[20.0,60.0]")
            params[f"{sign}_outlier_range"] = tuple(float(x) for x in rng)
        fixed = round(params["zero_fraction"] * params["n"]) + params["num_positive_outliers"] + \
            params["num_negative_outliers"]
        if fixed > params["n"]:
            raise V.ConfigError("dataset.n", params["n"], f"too small for {fixed} zeros and outliers",
                                "dataset.n=1000")
    return {"name": name, **params}


def build_matrix(params: dict, dtype: torch.dtype, device: torch.device) -> MatrixProblem:
    """Generate the matrix described by :func:`validate_matrix_dataset`'s output."""
    name, n, seed = params["name"], params["n"], params["seed"]
    if name == "wigner":
        std = params["std"]
        return MatrixProblem(name, rm.wigner(n, seed=seed, std=std, dtype=dtype, device=device),
                             edges=rm.semicircle_edges(std),
                             density=lambda x: rm.semicircle_density(x, std), params=params)
    if name == "marchenko_pastur":
        q = params["ratio"]
        return MatrixProblem(name, rm.marchenko_pastur(n, q, seed=seed, dtype=dtype, device=device),
                             edges=rm.marchenko_pastur_edges(q),
                             density=lambda x: rm.marchenko_pastur_density(x, q),
                             atom_at_zero=rm.marchenko_pastur_atom(q),
                             params={**params, "t": rm.mp_columns(n, q)})
    spectrum = {k: v for k, v in params.items() if k not in ("name", "n", "seed")}
    eigenvalues = rm.synthetic_spectrum_eigenvalues(n, seed=seed, **spectrum)
    return MatrixProblem(name, rm.synthetic_spectrum(n, seed=seed, dtype=dtype, device=device, **spectrum),
                         atom_at_zero=float((eigenvalues == 0).double().mean()), eigenvalues=eigenvalues,
                         params=params)
