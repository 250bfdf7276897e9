"""The config schema (experiments/schema.py): every preset passes, typo keys and non-booleans are refused,
the rules' enumerations are the analyses' own lists, and a new yaml file is checked with no new code."""

import shutil

import pytest
from hydra import compose, initialize_config_dir

from experiments import schema
from experiments.schema import RULES, check_config, options
from experiments.validate import ConfigError
from tests.conftest import CONF

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides, conf=CONF):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(_compose(*overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_preset_passes():
    assert len(PRESETS) >= 40
    for preset in PRESETS:
        check_config(_compose(f"experiment={preset}"))


@pytest.mark.parametrize("group", schema.GROUPS)
def test_every_option_of_every_group_passes_with_its_defaults(group):
    needs = {"analysis": ["dataset=digits", "model=cnn"], "model": ["dataset=digits"], "optimizer": [],
             "dataset": [], "operator": [], "logger": []}[group]
    for name in options(group):
        extra = {("model", "custom"): ["model._target_=torch.nn.Linear"],
                 ("optimizer", "custom"): ["optimizer._target_=torch.optim.SGD"]}.get((group, name), [])
        files = options(group)[name].files[0].removeprefix("conf/").removesuffix(".yaml").split("/", 1)[1]
        check_config(_compose(*needs, f"{group}={files}", *extra))


@pytest.mark.parametrize("override,suggestion", [
    ("+analysis.num_step=10", "did you mean analysis.num_steps?"),
    ("+analysis.lr=0.1", "did you mean optimizer.lr?"),
    ("+seeds=1", "did you mean seed?"),
    ("+operator.batchsize=8", "did you mean operator.batch_size?"),
    ("+analysis.tolerances.outliers=0.1", "did you mean analysis.tolerances.outlier?"),
])
def test_a_typo_key_is_refused_with_the_closest_key(override, suggestion):
    message = _error(override)
    assert override[1:].split("=")[0] in message and "unknown key" in message and suggestion in message


@pytest.mark.parametrize("override", ["overwrite=no", "overwrite=maybe", "distributed=yes", "overwrite=1",
                                      "analysis.save_ritz_vectors=0", "operator.check_deterministic=off"])
def test_booleans_must_be_real_booleans(override):
    key = override.split("=")[0]
    assert f"config key {key}=" in _error(override) and "must be true or false" in _error(override)


def test_model_batch_norm_maybe_is_refused():
    assert "model.batch_norm='maybe'" in _error("dataset=digits", "model=cnn", "model.batch_norm=maybe")


@pytest.mark.parametrize("override,key", [
    ("dataset.std=inf", "dataset.std"), ("dataset.std=1e154", "dataset.std"), ("dataset.std=nan", "dataset.std"),
    ("optimizer.lr=inf", "optimizer.lr"), ("operator.params=[]", "operator.params"),
    ("analysis.num_steps=2.5", "analysis.num_steps"), ("analysis.start_vector=uniform", "analysis.start_vector"),
    ("analysis.checkpoint=3", "analysis.checkpoint"), ("analysis.tolerances.psd=-1", "analysis.tolerances.psd"),
    ("analysis.tolerances=3", "analysis.tolerances"), ("logger.tags=[1]", "logger.tags"),
])
def test_types_ranges_and_finiteness(override, key):
    assert f"config key {key}=" in _error(override)


def test_open_options_take_extra_keys_but_finite_ones():
    check_config(_compose("model=custom", "model._target_=a.Net", "+model.depth=4", "+model.blocks={a: 1}"))
    assert "model.scale" in _error("model=custom", "model._target_=a.Net", "+model.scale=inf")
    assert "model._target_='???'" in _error("model=custom")
    check_config(_compose("operator.loss={_target_:torch.nn.CrossEntropyLoss,label_smoothing:0.1}"))
    assert "operator.loss" in _error("operator.loss={label_smoothing:0.1}")


def test_every_null_default_has_an_explicit_rule():
    """A key whose default is null has no type to go by: it needs a line in RULES."""
    missing = []
    for group in schema.GROUPS:
        for option in options(group).values():
            for key, value in _leaves(group, option.defaults):
                if value is None and schema.rule_for(key, None, option.name) is None:
                    missing.append(f"{key} ({option.files[0]})")
    for key, value in schema.root_defaults().items():
        if value is None and schema.rule_for(key, None) is None:
            missing.append(key)
    assert not missing, missing


def _leaves(prefix, node):
    for key, value in node.items():
        if isinstance(value, dict) and key != "loss":
            yield from _leaves(f"{prefix}.{key}", value)
        else:
            yield f"{prefix}.{key}", value


def test_enumerations_are_the_analyses_own_lists():
    from curvature.graph_cache import CACHE_MODES
    from curvature.landscape import BN_MODES as LANDSCAPE_BN
    from curvature.losses import REDUCTIONS
    from curvature.operators import LOSSES, OPERATORS
    from curvature.weight_esd import CONV2D_MODES
    from experiments.diagonal import CHECKS, METHODS
    from experiments.peers import PEERS
    from experiments.theory import CLAIMS

    def accepts(key, values):
        return all(RULES[key].check(v) is None for v in values)

    assert accepts("analysis[diagonal].method", METHODS) and accepts("analysis[diagonal].checks", [list(CHECKS)])
    assert accepts("analysis[theory].claim", CLAIMS) and accepts("analysis[weight_esd].conv2d", CONV2D_MODES)
    assert accepts("analysis[benchmark].peers", [list(PEERS)]) and accepts("operator.cache", CACHE_MODES)
    assert accepts("analysis[landscape].bn_mode", LANDSCAPE_BN) and accepts("operator.reduction", REDUCTIONS)
    assert accepts("operator.loss", LOSSES) and accepts("analysis.operators", [list(OPERATORS)])
    assert RULES["analysis[diagonal].method"].check("magic") and RULES["operator.loss"].check("hinge")
    from curvature.fisher import FISHER_KINDS
    from curvature.top_eigen import CRITERIA, WHICH
    assert accepts("analysis[top_eigen].which", WHICH) and accepts("analysis.power_criterion", CRITERIA)
    assert accepts("operator[fisher].kind", FISHER_KINDS)
    from curvature.trace import DISTRIBUTIONS
    assert accepts("analysis[trace].distribution", DISTRIBUTIONS)


def test_a_new_analysis_yaml_is_checked_by_the_types_of_its_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "analysis" / "novel.yaml").write_text(
        "name: novel\nsteps: 10\nscale: 0.5\nenabled: false\nmode: fast\nsizes: [1, 2]\n")
    monkeypatch.setattr(schema, "CONF", conf)
    schema.options.cache_clear()
    schema.root_defaults.cache_clear()
    try:
        check_config(_compose("analysis=novel", conf=conf))
        for override, words in [("analysis.steps=1.5", "must be an integer"), ("analysis.scale=inf", "finite"),
                                ("analysis.enabled=maybe", "true or false"), ("analysis.mode=3", "string"),
                                ("analysis.sizes=[a]", "integer"), ("+analysis.step=3", "analysis.steps?")]:
            with pytest.raises(ConfigError, match=words):
                check_config(_compose("analysis=novel", override, conf=conf))
    finally:
        schema.options.cache_clear()
        schema.root_defaults.cache_clear()
