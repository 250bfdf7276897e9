"""Experiment layer: Hydra configs -> analyses -> results files, figures and W&B.

``python -m experiments.run`` is the one entry point; each analysis lives in
``experiments/<analysis>.py`` with a ``run(cfg) -> dict`` that tests and notebooks call directly.
"""
