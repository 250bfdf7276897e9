"""Deep Curvature Suite: the library.

Plain PyTorch and GPyTorch; it never imports Hydra or W&B, so everything here works in a notebook:

    from curvature.lanczos import lanczos
    from curvature.spectrum import SpectralMeasure
    from curvature.random_matrices import wigner, marchenko_pastur
"""

__version__ = "0.1.0"
