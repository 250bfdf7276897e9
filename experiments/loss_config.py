"""The loss of the curvature operators from config: ``operator.loss`` and its options.

    operator.loss=cross_entropy operator.label_smoothing=0.1        # a named loss with options
    operator.reduction=sum                                           # mean (default) | sum
    'operator.loss={_target_: torch.nn.CrossEntropyLoss, ignore_index: 0}'   # any loss class, keywords

A named loss keeps the plain function every analysis already handles when its options are the
defaults; otherwise the operators get a :class:`curvature.losses.Loss` (closed-form output Hessians
for cross-entropy with smoothing, class weights or a sum, exact autograd ones for other losses).
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from curvature.errors import SuiteError
from curvature.losses import REDUCTIONS, as_loss, loss_rule
from curvature.models import _import_target
from curvature.operators import LOSSES
from experiments import validate as V


def validate_loss(cfg: DictConfig) -> dict:
    """``{"loss": name or {"_target_": ..., keywords}, "reduction": ..., "label_smoothing": ...}``."""
    loss = V.get(cfg, "operator.loss")
    if isinstance(loss, dict):
        target = loss.get("_target_")
        if not isinstance(target, str) or "." not in target:
            raise V.ConfigError("operator.loss._target_", target, "must be the import path of a loss class",
                                "'operator.loss={_target_: torch.nn.CrossEntropyLoss}'")
    else:
        loss = V.choice(cfg, "operator.loss", list(LOSSES), "operator.loss=cross_entropy")
    reduction = V.choice(cfg, "operator.reduction", list(REDUCTIONS), "operator.reduction=mean") \
        if V.get(cfg, "operator.reduction", None) is not None else "mean"
    smoothing = V.number(cfg, "operator.label_smoothing", 0.0, 1.0, example="operator.label_smoothing=0.1") \
        if V.get(cfg, "operator.label_smoothing", None) is not None else 0.0
    if smoothing and loss != "cross_entropy":
        raise V.ConfigError("operator.label_smoothing", smoothing, "applies to operator.loss=cross_entropy only "
                            "(a _target_ loss takes its own keywords)", "operator.label_smoothing=0")
    return {"loss": loss, "reduction": reduction, "label_smoothing": float(smoothing)}


def is_plain(o: dict) -> bool:
    """A named loss with default options: the plain function every analysis handles."""
    return isinstance(o["loss"], str) and o["reduction"] == "mean" and not o["label_smoothing"]


def build_loss(o: dict) -> Callable:
    """The loss callable for validated operator settings (see :func:`validate_loss`)."""
    if is_plain(o):
        return LOSSES[o["loss"]]
    if isinstance(o["loss"], str):
        options = {"label_smoothing": o["label_smoothing"]} if o["loss"] == "cross_entropy" else {}
        return loss_rule(o["loss"], reduction=o["reduction"], **options)
    keywords = {k: v for k, v in o["loss"].items() if k != "_target_"}
    try:
        cls = _import_target(o["loss"]["_target_"])
    except (SuiteError, ImportError) as error:
        raise V.ConfigError("operator.loss._target_", o["loss"]["_target_"], "cannot be imported; give the full "
                            "import path of a loss class or function",
                            "'operator.loss={_target_: torch.nn.CrossEntropyLoss}'") from error
    try:
        loss = cls(**keywords)
    except (TypeError, ValueError) as error:
        raise V.ConfigError("operator.loss._target_", o["loss"]["_target_"],
                            f"cannot build the loss ({str(error).splitlines()[0]})",
                            "'operator.loss={_target_: torch.nn.CrossEntropyLoss}'") from error
    if not callable(loss):
        raise V.ConfigError("operator.loss._target_", o["loss"]["_target_"], "did not build a callable loss",
                            "'operator.loss={_target_: torch.nn.CrossEntropyLoss}'")
    return as_loss(loss, reduction=None if o["reduction"] == "mean" else o["reduction"])
