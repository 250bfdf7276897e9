"""The config schema: every key of every group checked by type and range before any analysis runs.

The allowed keys and their default types come from the yaml files themselves (``conf/config.yaml`` and
``conf/<group>/*.yaml``), so an analysis or model added as a new yaml file is checked with no change
here: a key whose default is a boolean takes only ``true`` / ``false``, an integer default an integer,
a float default a finite number, a string default a string, a list default a list of the same kind of
element, a nested mapping its own keys. ``RULES`` below adds ranges, enumerations and the keys whose
default is null or that take several types. A key that no yaml file of its group declares is refused
with the closest known key (``+analysis.num_step=10``: "did you mean analysis.num_steps?").

    check_config(cfg)   # raises experiments.validate.ConfigError naming the key, the value and the fix

The analyses keep their own checks of relations between keys (files exist, a size fits the data);
this module checks each value on its own.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader

from experiments.config_source import config_dir
from experiments.validate import ConfigError, get

CONF = config_dir()  # conf/ of the checkout, or the installed experiments.conf package
GROUPS = ("analysis", "model", "dataset", "operator", "optimizer", "logger")
#: Options whose every extra key is passed on to a user's class (constructor keywords).
OPEN_OPTIONS = {("model", "custom"), ("optimizer", "custom")}
#: Largest magnitude of a matrix dataset's scale: the spectrum's moments up to k = 8 stay finite in float64.
MAX_SCALE = 1e30
UNRESOLVED = object()
_INTERPOLATION = re.compile(r"^\$\{([^${}]+)\}$")


# --- rules: each checks one plain value and returns what is wrong with it, or None -------------------
@dataclass(frozen=True)
class Rule:
    """A value check: ``check(value)`` is None when the value is valid, else the requirement in words."""
    text: str
    test: Callable[[Any], bool]
    example: str | None = None   # the value to suggest; None: the default

    def check(self, value: Any) -> str | None:
        return None if self.test(value) else self.text


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo, hi, strict_lo=False, strict_hi=False) -> str:
    parts = ([f"{'>' if strict_lo else '>='} {lo:g}"] if lo is not None else []) + \
            ([f"{'<' if strict_hi else '<='} {hi:g}"] if hi is not None else [])
    return (" " + " and ".join(parts)) if parts else ""


def _in(v, lo, hi, strict_lo=False, strict_hi=False) -> bool:
    return (lo is None or (v > lo if strict_lo else v >= lo)) and (hi is None or (v < hi if strict_hi else v <= hi))


def Int(lo: int | None = None, hi: int | None = None) -> Rule:
    if lo is not None and hi is not None:
        text = f"must be an integer in [{lo}, {hi}]"
    else:
        text = "must be an integer" + _bounds(lo, hi)
    return Rule(text, lambda v: _is_int(v) and _in(v, lo, hi))


def Num(lo: float | None = None, hi: float | None = None, strict_lo=False, strict_hi=False) -> Rule:
    return Rule("must be a finite number" + _bounds(lo, hi, strict_lo, strict_hi),
                lambda v: _is_number(v) and _in(v, lo, hi, strict_lo, strict_hi))


POSITIVE = Num(0, None, strict_lo=True)
NONNEGATIVE = Num(0, None)
PROBABILITY = Num(0, 1)
POSITIVE_INT = Int(1)
COUNT = Int(0)
BOOL = Rule("must be true or false", lambda v: isinstance(v, bool), "true")
STR = Rule("must be a string", lambda v: isinstance(v, str) and v != "")
PATH = Rule("must be a path (a string)", lambda v: isinstance(v, str) and v != "", "<path>")
ANY_STR = Rule("must be a string", lambda v: isinstance(v, str))
ANY = Rule("must hold finite numbers only", lambda v: _finite_tree(v))


def Choice(*options) -> Rule:
    words = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return Rule(f"must be one of {words}", lambda v: any(v == o and type(v) is type(o) for o in options),
                str(options[0]).lower() if isinstance(options[0], bool) else str(options[0]))


def Nullable(rule: Rule) -> Rule:
    text = rule.text if "null" in rule.text else "must be null or " + rule.text.removeprefix("must be ")
    return Rule(text, lambda v: v is None or rule.test(v), rule.example)


def Either(*rules: Rule, text: str | None = None) -> Rule:
    return Rule(text or " or ".join(r.text.removeprefix("must be ") for r in rules).join(["must be ", ""]),
                lambda v: any(r.test(v) for r in rules), rules[0].example)


def ListOf(item: Rule, min_len: int = 0, length: int | None = None) -> Rule:
    what = f"a list of {length}" if length else ("a non-empty list" if min_len else "a list")
    return Rule(f"must be {what} whose items are each {item.text.removeprefix('must be ')}",
                lambda v: isinstance(v, list) and len(v) >= min_len and (length is None or len(v) == length)
                and all(item.test(x) for x in v))


def _finite_tree(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite_tree(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite_tree(x) for x in v)
    return True


LOSS = Either(Choice("cross_entropy", "mse"),
              Rule("", lambda v: isinstance(v, dict) and isinstance(v.get("_target_"), str) and _finite_tree(v)),
              text="must be cross_entropy, mse or {_target_: <loss class>, <keyword>: <value>, ...}")
BLOCKS = Nullable(Either(Choice("layer"), ListOf(ListOf(STR, 1), 1),
                         text="must be null, layer, or a list of lists of glob patterns"))
CHECKPOINTS = Nullable(ListOf(PATH, 1))
SCALE = Num(-MAX_SCALE, MAX_SCALE)

#: Explicit rules by dotted key; ``analysis[spectrum].x`` applies to that option only and wins over
#: ``analysis.x``; ``*`` matches one key. Keys not listed get the rule of their default's type.
RULES: dict[str, Rule] = {
    # root
    "seed": Int(0), "device": Choice("auto", "cpu", "cuda"), "dtype": Choice("float32", "float64"),
    "experiment_id": Nullable(STR), "run_name": STR, "output_dir": Nullable(PATH), "overwrite": BOOL,
    "resume": Nullable(Either(BOOL, Rule("", lambda v: isinstance(v, str) and v.endswith(".pt")),
                              text="must be null, true, false or the path of a checkpoint-XXXXX.pt")),
    "distributed": Either(BOOL, Choice("fsdp"), text="must be true or false, or fsdp"),
    # analysis: shared names
    "analysis.checkpoint": Nullable(PATH), "analysis.checkpoints": CHECKPOINTS,
    "analysis.checkpoint_dir": Nullable(PATH), "analysis.checkpoints_dir": Nullable(PATH),
    "analysis.spectrum_dir": Nullable(PATH), "analysis.ritz_vectors_file": Nullable(PATH),
    "analysis.spectrum_file": Nullable(PATH),
    "analysis.num_steps": POSITIVE_INT, "analysis.num_vectors": POSITIVE_INT, "analysis.lanczos_steps": COUNT,
    "analysis.start_vector": Choice("gaussian", "rademacher"), "analysis.exact_max_dim": COUNT,
    "analysis.histogram_bins": POSITIVE_INT, "analysis.batch_size": POSITIVE_INT,
    "analysis.operators": Nullable(Rule("must be null or a non-empty list of operator names (conf/operator/)",
                                        lambda v: isinstance(v, list) and len(v) > 0 and
                                        all(isinstance(o, str) and o in options("operator") for o in v),
                                        "[ggn,hessian]")),
    "analysis.data_split": Choice("train", "test"), "analysis.tolerances.*": POSITIVE,
    "analysis.targets.*": POSITIVE,
    # spectrum
    "analysis[spectrum].exact_max_dim": Either(Choice("auto"), COUNT, text="must be auto or an integer >= 0"),
    "analysis[spectrum].checkpoint": Nullable(Either(PATH, ListOf(PATH, 1), text="must be a checkpoint file, a "
                                                     "folder of them or a non-empty list of files and folders")),
    "analysis[spectrum].negative_band": Num(0, 1, strict_hi=True),
    "analysis[spectrum].basis_device": Choice("device", "cpu", "disk"),
    "analysis[spectrum].basis_dir": Nullable(PATH), "analysis[spectrum].basis_chunk_mb": POSITIVE,
    "analysis.lanczos_engine": Choice("native", "gpytorch"), "analysis.checkpoint_every": COUNT,
    "analysis.report_steps": Nullable(Either(POSITIVE_INT, ListOf(POSITIVE_INT, 1),
                                             text="must be null or a non-empty list of integers >= 1")),
    "analysis.blocks": BLOCKS,
    # benchmark
    "analysis.repeats": POSITIVE_INT, "analysis[benchmark].lanczos_steps": POSITIVE_INT,
    "analysis[benchmark].peers": ListOf(Choice("pyhessian", "hessian_eigenthings", "curvlinops", "backpack")),
    "analysis.side_steps": POSITIVE_INT, "analysis.side_vectors": COUNT,
    # diagonal
    "analysis[diagonal].method": Choice("exact", "mc_ggn", "hutchinson", "adam"), "analysis.num_samples": POSITIVE_INT,
    "analysis.block_size": POSITIVE_INT,
    "analysis[diagonal].checks": ListOf(Choice("lanczos_beats_diagonal", "diagonal_max", "zero_mass",
                                               "diagonal_max_differs")),
    # kernel_smoothing
    "analysis.sigmas": Nullable(ListOf(POSITIVE)), "analysis.scaled_variances": Nullable(ListOf(POSITIVE)),
    "analysis.max_moment": Int(1, 12), "analysis.tolerance": POSITIVE, "analysis.zero_window": POSITIVE,
    "analysis.points_per_sigma": Num(1), "analysis.plot_points": Int(10),
    # landscape
    "analysis.positions": ListOf(Either(Int(), Choice("near_zero")), 1),
    "analysis.random_directions": ListOf(Choice("gaussian", "filter")),
    "analysis.dist": POSITIVE, "analysis.num_points": Int(3), "analysis[landscape].bn_mode":
        Choice("recompute", "train", "eval"),
    "analysis.quadratic_tolerance": POSITIVE, "analysis.check_t": POSITIVE, "analysis.check_tolerance": POSITIVE,
    "analysis.figure_metrics": ListOf(Choice("loss", "accuracy"), 1),
    # theory
    "analysis[theory].claim": Choice("thm1", "thm2", "table1", "lemma1"),
    "analysis.thm1.shifts": ListOf(SCALE, 1), "analysis.*.num_steps": POSITIVE_INT,
    "analysis.*.tolerance": POSITIVE, "analysis.*.num_draws": Int(2), "analysis.thm2.match_tolerance": POSITIVE,
    "analysis.thm2.max_matched_fraction": PROBABILITY,
    "analysis.table1.ratios": ListOf(Num(1, MAX_SCALE, strict_lo=True), 1),
    "analysis.table1.steps": ListOf(POSITIVE_INT, 1), "analysis.table1.empirical_dim": Int(3),
    "analysis.table1.empirical_steps": POSITIVE_INT, "analysis.table1.rounding": POSITIVE,
    "analysis.lemma1.sizes": ListOf(Int(2), 1), "analysis.lemma1.powers": ListOf(POSITIVE_INT, 1),
    "analysis.lemma1.slope_tolerance": POSITIVE,
    # train
    "analysis.epochs": POSITIVE_INT, "analysis[train].schedule": Choice("linear", "constant"),
    "analysis.lr_final_ratio": Num(0, 1, strict_lo=True), "analysis.save_freq": POSITIVE_INT,
    "analysis.eval_batch_size": POSITIVE_INT, "analysis.target_test_accuracy": Nullable(PROBABILITY),
    "analysis.swa.start": COUNT, "analysis.swa.lr": POSITIVE, "analysis.step_cost_repeats": POSITIVE_INT,
    "analysis[train].curvature.every": COUNT,
    "analysis[train].curvature.quantities": ListOf(Choice("top_eigenvalue", "trace", "spectrum"), 1),
    "analysis[train].curvature.operator": Choice("hessian", "ggn"),
    "analysis[train].curvature.bn_mode": Choice("train", "eval"),
    "analysis[train].curvature.data.num_samples": Nullable(POSITIVE_INT),
    "analysis[train].curvature.data.batch_size": POSITIVE_INT, "analysis[train].curvature.tol": POSITIVE,
    "analysis[train].curvature.max_matvecs": POSITIVE_INT, "analysis[train].curvature.trace_probes": POSITIVE_INT,
    "analysis[train].curvature.spectrum_steps": POSITIVE_INT,
    "analysis[train].curvature.spectrum_vectors": POSITIVE_INT,
    # weight_esd
    "analysis[weight_esd].conv2d": Choice("slices", "per_slice", "unfold"), "analysis.svd_max_dim": POSITIVE_INT,
    "analysis[weight_esd].lanczos_steps": Int(2), "analysis.lanczos_tol": POSITIVE, "analysis.min_evals": Int(2),
    "analysis.zero_tol": PROBABILITY, "analysis.tw_margin": NONNEGATIVE, "analysis.alpha_low": POSITIVE,
    "analysis.alpha_high": POSITIVE, "analysis.max_plot_panels": POSITIVE_INT,
    # top_eigen
    "analysis.k": POSITIVE_INT, "analysis[top_eigen].which": Choice("largest", "smallest", "both", "magnitude"),
    "analysis.tol": POSITIVE, "analysis.max_matvecs": POSITIVE_INT, "analysis.basis_size": Nullable(POSITIVE_INT),
    "analysis.power_criterion": Choice("residual", "eigenvalue"), "analysis.power_max_iter": POSITIVE_INT,
    # laplace
    "analysis.prior_precision": POSITIVE, "analysis.num_test": POSITIVE_INT,
    "analysis.select": Choice("balanced", "first"), "analysis.weights": Choice("last_layer", "all"),
    "analysis.max_iter": POSITIVE_INT, "analysis.mc_samples": POSITIVE_INT, "analysis.train_epochs": COUNT,
    "analysis.train_lr": POSITIVE, "analysis.train_batch_size": POSITIVE_INT, "analysis.dense_max_dim": COUNT,
    "analysis.dense_tolerance": POSITIVE,
    # trace
    "analysis[trace].method": Choice("hutchinson", "hutchpp", "slq", "all"), "analysis.num_matvecs": POSITIVE_INT,
    "analysis[trace].distribution": Choice("rademacher", "gaussian"), "analysis.slq_steps": POSITIVE_INT,
    "analysis.stderr_multiple": POSITIVE,
    "analysis[trace].peers": ListOf(Choice("hessian_eigenthings", "pyhessian", "curvlinops")),
    # dataset
    "dataset.kind": Choice("matrix", "images", "text"), "dataset.data_dir": Nullable(PATH),
    "dataset.num_classes": Int(2), "dataset.val_size": COUNT, "dataset.num_subsamples": Nullable(POSITIVE_INT),
    "dataset.batch_size": POSITIVE_INT, "dataset.fake_train": POSITIVE_INT, "dataset.fake_test": POSITIVE_INT,
    "dataset.n": POSITIVE_INT, "dataset.seed": Int(0), "dataset.std": Num(0, MAX_SCALE, strict_lo=True),
    "dataset.ratio": Num(0, MAX_SCALE, strict_lo=True), "dataset.zero_fraction": PROBABILITY,
    "dataset.bulk_low": SCALE, "dataset.bulk_high": SCALE, "dataset.bulk_shape": Choice("uniform", "skewed"),
    "dataset.num_*_outliers": COUNT, "dataset.*_outlier_range": ListOf(SCALE, length=2),
    "dataset.path": Nullable(PATH), "dataset.context": POSITIVE_INT,
    "dataset.test_fraction": Num(0, 1, strict_lo=True, strict_hi=True), "dataset.split_seed": Int(0),
    # model
    "model.channels": ListOf(POSITIVE_INT, 1), "model.hidden": ListOf(POSITIVE_INT),
    "model.width": Num(0, 1e3, strict_lo=True), "model.depth": POSITIVE_INT, "model.heads": POSITIVE_INT,
    "model.dropout": Num(0, 1, strict_hi=True), "model._target_": STR,
    # operator
    "operator.loss": LOSS, "operator[fisher].kind": Choice("empirical", "monte_carlo"),
    "operator.mc_samples": POSITIVE_INT, "operator.reduction": Choice("mean", "sum"),
    "operator.label_smoothing": PROBABILITY, "operator.bn_mode": Choice("train", "eval"),
    "operator.params": Nullable(Rule("must be null (every parameter) or a non-empty list of glob patterns of "
                                     "parameter names", lambda v: isinstance(v, list) and len(v) > 0
                                     and all(isinstance(p, str) and p for p in v), "[features.0.*]")),
    "operator.batch_size": POSITIVE_INT,
    "operator.hvp_mode": Choice("auto", "forward_over_reverse", "reverse_over_reverse"),
    "operator.layerwise": Choice("auto", True, False), "operator.cache": Nullable(Choice("auto", "all", "none")),
    "operator.product": Choice("exact", "finite_difference"),
    "operator.fd_step": Either(Choice("auto"), Num(0, MAX_SCALE, strict_lo=True),
                               text="must be auto or a finite number > 0"),
    # optimizer
    "optimizer.lr": POSITIVE, "optimizer.momentum": PROBABILITY, "optimizer.weight_decay": NONNEGATIVE,
    "optimizer.betas": ListOf(Num(0, 1, strict_hi=True), length=2), "optimizer.eps": POSITIVE,
    "optimizer.switch_tol": Nullable(POSITIVE), "optimizer.damping": Nullable(POSITIVE),
    "optimizer.damping_ratio": POSITIVE, "optimizer.lanczos_steps": POSITIVE_INT,
    "optimizer.curvature_batch_size": POSITIVE_INT, "optimizer.bn_mode": Choice("train", "eval"),
    "optimizer.start_vector": Choice("random", "gradient"),
    "optimizer.hvp_mode": Choice("auto", "forward_over_reverse", "reverse_over_reverse"),
    "optimizer.seed": Int(0), "optimizer.stat_decay": Num(0, 1, strict_hi=True),
    "optimizer.cov_update_period": POSITIVE_INT, "optimizer.inv_update_period": POSITIVE_INT,
    "optimizer.kl_clip": Nullable(POSITIVE), "optimizer._target_": STR,
    # logger
    "logger.entity": Nullable(STR), "logger.mode": Choice("offline", "online", "disabled"),
    "logger.group": Nullable(STR), "logger.tags": ListOf(STR), "logger.job_type": STR,
}


# --- the defaults of each group, read from the yaml files ------------------------------------------
@dataclass
class Option:
    """One option of a group (e.g. analysis=spectrum): its defaults, unresolved, and its file."""
    group: str
    name: str
    defaults: dict
    files: list[str] = field(default_factory=list)


def _load(path: Path) -> dict:
    node = yaml.load(path.read_text(encoding="utf-8"), Loader=get_yaml_loader()) or {}  # OmegaConf's parsing
    merged: dict = {}
    for entry in node.pop("defaults", []) or []:   # e.g. optimizer/fig1/*: `- /optimizer/sgd@_here_`
        if isinstance(entry, str) and entry.startswith("/") and entry.endswith("@_here_"):
            merged = _merge(merged, _load(CONF / f"{entry[1:-len('@_here_')]}.yaml"))
    return _merge(merged, node)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.lru_cache(maxsize=None)
def options(group: str) -> dict[str, Option]:
    """Every option of ``group`` by its ``name`` key; files sharing a name (optimizer/fig1/*) pool keys."""
    found: dict[str, Option] = {}
    for path in sorted((CONF / group).rglob("*.yaml")):
        defaults = _load(path)
        name = str(defaults.get("name", path.stem))
        rel = str(path.relative_to(CONF.parent))
        if name in found:
            found[name].defaults = _merge(found[name].defaults, defaults)
            found[name].files.append(rel)
        else:
            found[name] = Option(group, name, defaults, [rel])
    return found


@functools.lru_cache(maxsize=None)
def root_defaults() -> dict:
    node = _load(CONF / "config.yaml")
    node.pop("hydra", None)
    return node


# --- checking ----------------------------------------------------------------------------------------
def rule_for(key: str, default: Any, option: str | None = None, context: dict | None = None) -> Rule | None:
    """The rule of dotted ``key`` (of group option ``option``): explicit, else from its default's type."""
    group, _, rest = key.partition(".")
    own = f"{group}[{option}].{rest}" if option and rest else None
    if own in RULES:
        return RULES[own]
    shared = RULES.get(key) or next((rule for pattern, rule in RULES.items() if "*" in pattern and "[" not in pattern
                                     and pattern.count(".") == key.count(".") and fnmatch.fnmatchcase(key, pattern)),
                                    None)
    # A shared rule that refuses an option's own default is about another option's key of the same name
    # (a new analysis's analysis.method): that option's key goes by the type of its default.
    if shared is not None and (default is None or isinstance(default, str) and "${" in default
                               or shared.check(default) is None):
        return shared
    return _from_default(default, context)


def _from_default(default: Any, context: dict | None) -> Rule | None:
    if isinstance(default, bool):
        return BOOL
    if _is_int(default):
        return Int()
    if isinstance(default, float):
        return Num()
    if isinstance(default, str):
        match = _INTERPOLATION.match(default)
        if match and context is not None:          # e.g. analysis.batch_size: ${dataset.batch_size}
            target = match.group(1)
            return rule_for(target, _default_of(target, context), _option_of(target, context), context)
        return STR if "${" not in default and default != "???" else ANY_STR
    if isinstance(default, list):
        kinds = {_kind(x) for x in default}
        if len(kinds) == 1:
            item = _from_default(default[0], None)
            return ListOf(item) if item else ListOf(ANY)
        return ListOf(ANY)
    if isinstance(default, dict):
        return Rule("must be a mapping of its own keys", lambda v: isinstance(v, dict))
    return None   # null default without an explicit rule: any finite value (see test_schema)


def _kind(value: Any) -> str:
    return "number" if _is_number(value) and not _is_int(value) else type(value).__name__


def _option_of(key: str, context: dict) -> str | None:
    group = key.split(".", 1)[0]
    value = context.get(group)
    return str(value.get("name")) if isinstance(value, dict) and value.get("name") is not None else None


def _default_of(key: str, context: dict) -> Any:
    group, _, rest = key.partition(".")
    if group in GROUPS:
        option = options(group).get(_option_of(key, context) or "")
        node: Any = option.defaults if option else {}
        parts = rest.split(".")
    else:
        node, parts = root_defaults(), key.split(".")
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _values(cfg: DictConfig, prefix: str = "") -> dict:
    """The plain, resolved config; a missing (``???``) or unresolvable value fails naming its key."""
    out = {}
    node = OmegaConf.select(cfg, prefix) if prefix else cfg
    for key in node.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(path, "???", "must be given for this run", f"{path}=<value>")
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            out[key] = _values(cfg, path)
            continue
        try:
            out[key] = get(cfg, path)
        except ConfigError:   # an interpolation into a key this run lacks: the analysis says which
            out[key] = UNRESOLVED
    return out


def _unknown(key: str, value: Any, own: list[str], everything: list[str], where: str) -> ConfigError:
    """Refuse ``key``, suggesting the closest key of its own option, else of the whole suite."""
    group = key.split(".", 1)[0] + "." if "." in key else ""
    rests = {k.removeprefix(group): k for k in own}   # compare what follows the shared "analysis."
    close = [rests[k] for k in difflib.get_close_matches(key.removeprefix(group), list(rests), n=1, cutoff=0.7)]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = sorted((k for k in everything if k.rsplit(".", 1)[-1] == leaf), key=lambda k: k.count("."))
    close = close or same_leaf[:1] or difflib.get_close_matches(key, everything, n=1, cutoff=0.8)
    hint = f"did you mean {close[0]}?" if close else f"remove it (the keys are listed in {where})"
    return ConfigError(key, value, f"unknown key (not in {where}); {hint}")


def _walk(prefix: str, values: dict, defaults: dict, option: str | None, context: dict,
          own: list[str], everything: list[str], where: str, open_keys: bool) -> None:
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in defaults and not open_keys:
            raise _unknown(path, value, own, everything, where)
        default = defaults.get(key)
        if path == "operator.loss" or path.startswith("operator.loss."):
            rule = RULES["operator.loss"]     # a name, or a loss class's _target_ with its keywords
        elif isinstance(default, dict) and isinstance(value, dict):
            _walk(path, value, default, option, context, own, everything, where, open_keys)
            continue
        else:
            rule = rule_for(path, default, option, context) if key in defaults or key == "_target_" else ANY
        if rule is None or value is UNRESOLVED:
            continue
        problem = rule.check(value)
        if problem:
            example = rule.example if rule.example is not None else _example(default)
            raise ConfigError(path, value, problem, f"{path}={example}" if example is not None else None)


def _example(default: Any) -> str | None:
    if default is None or isinstance(default, dict) or (isinstance(default, str) and ("${" in default
                                                                                     or default == "???")):
        return None
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return "[" + ",".join(str(x) for x in default) + "]"
    return str(default)


def _known(prefix: str, defaults: dict) -> list[str]:
    out = []
    for key, value in defaults.items():
        path = f"{prefix}.{key}" if prefix else key
        out.append(path)
        if isinstance(value, dict) and key != "loss":
            out += _known(path, value)
    return out


@functools.lru_cache(maxsize=None)
def _every_key() -> list[str]:
    """Every key of the root config and of every group option, for "did you mean" across groups."""
    return list(root_defaults()) + sorted({f"{g}.{k}" for g in GROUPS for o in options(g).values()
                                           for k in _known("", o.defaults)})


def check_config(cfg: DictConfig) -> None:
    """Check every value of a composed config against the schema; raise :class:`ConfigError` (one line:
    the key, the value and the fix) on the first bad one."""
    values = _values(cfg)
    root, everything = root_defaults(), _every_key()
    _walk("", {k: v for k, v in values.items() if k not in (*GROUPS, "hydra")}, root, None, values, list(root),
          everything, "conf/config.yaml", False)
    for group in GROUPS:
        value = values.get(group)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(group, value, f"must be a {group} option", f"{group}=<option>")
        choices = options(group)
        name = value.get("name")
        if name not in choices:
            raise ConfigError(f"{group}.name", name, f"must be one of {', '.join(sorted(choices))}",
                              f"{group}={sorted(choices)[0]}")
        option = choices[name]
        where = " / ".join(option.files)
        own = [f"{group}.{k}" for k in _known("", option.defaults)]
        _walk(group, value, option.defaults, name, values, own, everything, where, (group, name) in OPEN_OPTIONS)
