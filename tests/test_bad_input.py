"""Bad input to every analysis, through the real CLI: exit status 2, exactly one line on stderr naming
the key or file, and no results.json / results.partial.json in the run folder.

Every row is a run of ``python -m experiments.run`` (the real ``@hydra.main`` entry point), forked from
one warmed-up interpreter by ``tests/cli_batch.py`` (two at a time): a fresh interpreter per row would
cost ~4 s of imports each. The table has two parts: hand-written rows (relations between keys, files,
checkpoints, data), and rows derived from the yaml files of each group, one or two bad values per key
by the type of its default and its range rule (``experiments/schema.py``), so a new analysis or group
option gets rows with no edit here.

Every derived row is refused by ``check_config`` (the first step of ``dispatch``, before anything is
written), so the CLI contract of all of them is one code path: the CLI table runs every hand-written row
and the first derived row of each analysis / group option / the root, and every derived row is also
checked in-process (``test_schema_refuses_every_derived_row_in_one_line``): Hydra's own override
application on the composed base config, ``check_config`` and the CLI's own error line
(``harness.describe``), at a few ms a row instead of a CLI run (~0.3 s of CPU each).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from curvature.errors import SuiteError
from curvature.training import save_checkpoint
from experiments import harness, schema
from experiments.validate import ConfigError
from experiments.run import dispatch
from experiments.schema import check_config
from tests.conftest import ROOT, make_cfg

DIGITS = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=100"]
CNN = ["dataset=digits", "model=cnn", "dataset.num_subsamples=100"]
TEXT = ["analysis=train", "dataset=text", "model=gpt_tiny"]
MATRIX = ["dataset.n=50", "analysis.num_steps=5"]

# (analysis, overrides, what the error line must name); {other_ckpt}, {corrupt}, {missing}, {file},
# {ckpt_dir}, {not_npz} are filled in by the fixture below.
HAND_ROWS = [
    # spectrum on a matrix dataset
    ("spectrum_matrix", ["analysis.checkpoint_every=-1"], "analysis.checkpoint_every"),
    ("spectrum_matrix", ["analysis.exact_max_dim=sometimes"], "analysis.exact_max_dim"),
    ("spectrum_matrix", ["analysis.num_vectors=1.5"], "analysis.num_vectors"),
    ("spectrum_matrix", ["analysis.lanczos_engine=gpytorch"], "analysis.checkpoint_every"),
    ("spectrum_matrix", ["resume=true"], "resume"),
    ("spectrum_matrix", ["resume=/some/checkpoint.pt"], "resume"),
    ("spectrum_matrix", ["resume=maybe"], "resume"),
    ("spectrum_matrix", ["analysis.blocks=layer"], "analysis.blocks"),
    ("spectrum_matrix", ["analysis.exact_max_dim=null"], "analysis.exact_max_dim"),
    ("spectrum_matrix", ["+analysis.num_step=10"], "did you mean analysis.num_steps?"),
    ("spectrum_matrix", ["overwrite=no"], "overwrite"),
    ("spectrum_matrix", ["overwrite=maybe"], "overwrite"),
    ("spectrum_matrix", ["dataset.std=inf"], "dataset.std"),
    ("spectrum_matrix", ["dataset.std=1e154"], "dataset.std"),
    ("spectrum_matrix", ["dataset.std=nan"], "dataset.std"),
    ("spectrum_matrix", ["dataset=marchenko_pastur", "dataset.ratio=-0.5"], "dataset.ratio"),
    ("spectrum_matrix", ["dataset=synthetic_spectrum", "dataset.bulk_low=2", "dataset.bulk_high=1"],
     "dataset.bulk_high"),
    ("spectrum_matrix", ["dataset=synthetic_spectrum", "dataset.positive_outlier_range=[5,1]"],
     "dataset.positive_outlier_range"),
    ("spectrum_matrix", ["dataset=synthetic_spectrum", "dataset.n=5"], "dataset.n"),
    ("spectrum_matrix", ["analysis.report_steps=[0]"], "analysis.report_steps"),
    ("spectrum_matrix", ["seed=-1"], "seed"),
    ("spectrum_matrix", ["device=tpu"], "device"),
    ("spectrum_matrix", ["dtype=float16"], "dtype"),
    ("spectrum_matrix", ["distributed=maybe"], "distributed"),
    ("spectrum_matrix", ["distributed=true"], "distributed"),
    ("spectrum_matrix", ["+lr=0.1"], "did you mean optimizer.lr?"),
    # spectrum on a network
    ("spectrum_network", ["dataset=cifar10", "dataset.data_dir={corrupt}", "model=cnn"], "data_batch_1"),
    ("spectrum_network", [*DIGITS, "operator.loss=hinge"], "operator.loss"),
    ("spectrum_network", [*DIGITS, "operator.reduction=none"], "operator.reduction"),
    ("spectrum_network", [*DIGITS, "operator.label_smoothing=1.5"], "operator.label_smoothing"),
    ("spectrum_network", [*DIGITS, "operator.loss=mse", "operator.label_smoothing=0.1"], "operator.label_smoothing"),
    ("spectrum_network", [*DIGITS, "operator.loss={{_target_:no_such_package.Loss}}"], "operator.loss._target_"),
    ("spectrum_network", [*DIGITS, "operator.loss={{reduction:sum}}"], "operator.loss"),
    ("spectrum_network", [*DIGITS, "analysis.checkpoint={missing}"], "analysis.checkpoint"),
    ("spectrum_network", [*CNN, "analysis.checkpoint={other_ckpt}"], "does not fit"),
    ("spectrum_network", [*DIGITS, "operator.batch_size=0"], "operator.batch_size"),
    ("spectrum_network", [*DIGITS, "analysis.exact_max_dim=1.5"], "analysis.exact_max_dim"),
    ("spectrum_network", [*DIGITS, "analysis.exact_max_dim=-1"], "analysis.exact_max_dim"),
    ("spectrum_network", [*DIGITS, "operator.params=[]"], "operator.params"),
    ("spectrum_network", [*DIGITS, "operator.params=[nothing.*]"], "operator.params"),
    ("spectrum_network", [*DIGITS, "operator.hvp_mode=sideways"], "operator.hvp_mode"),
    ("spectrum_network", [*DIGITS, "analysis.operators=[newton]"], "analysis.operators"),
    ("spectrum_network", [*DIGITS, "analysis.compare_vectors=true"], "analysis.num_vectors"),
    ("spectrum_network", [*DIGITS, "analysis.require_checkpoint=true"], "analysis.checkpoint"),
    ("spectrum_network", [*CNN, "model.batch_norm=maybe"], "model.batch_norm"),
    ("spectrum_network", [*CNN, "model.channels=[4,0]"], "model.channels"),
    ("spectrum_network", [*DIGITS, "dataset.num_subsamples=0"], "dataset.num_subsamples"),
    ("spectrum_network", [*DIGITS, "+dataset.fake=true"], "dataset.fake"),
    ("spectrum_network", [*DIGITS, "+model.depth=3"], "model.depth"),
    ("spectrum_network", ["dataset=digits", "model=gpt_tiny"], "dataset=text"),
    ("spectrum_network", ["dataset=digits", "model=custom"], "model._target_"),
    # per-block spectra
    ("blocks", [*CNN, "analysis.blocks=[[]]"], "analysis.blocks"),
    ("blocks", [*CNN, "analysis.blocks=[features.0.*]"], "analysis.blocks"),
    ("blocks", [*CNN, "analysis.blocks=[[conv1.*]]"], "matches no parameter"),
    ("blocks", [*CNN, "analysis.blocks=columns"], "analysis.blocks"),
    ("blocks", [*CNN, "analysis.blocks=3"], "analysis.blocks"),
    # train
    ("train", ["analysis=train", *DIGITS, "analysis.epochs=abc"], "analysis.epochs"),
    ("train", ["analysis=train", *DIGITS, "optimizer.lr=-1"], "optimizer.lr"),
    ("train", ["analysis=train", *DIGITS, "optimizer.lr=inf"], "optimizer.lr"),
    ("train", ["analysis=train", "dataset=cifar10", "dataset.data_dir={corrupt}", "model=cnn"], "data_batch_1"),
    ("train", ["analysis=train", *DIGITS, "resume=true"], "resume"),
    ("train", ["analysis=train", *DIGITS, "resume={missing}.pt"], "resume"),
    ("train", [*TEXT, "dataset.path={missing}"], "does-not-exist cannot be read"),
    ("train", [*TEXT, "dataset.path={file}"], "too few for one train and one test window"),
    ("train", [*TEXT, "dataset.augment=true"], "dataset.augment"),
    ("train", [*TEXT, "model.heads=5"], "multiple of heads"),
    ("train", [*TEXT, "optimizer=kfac"], "optimizer=adam"),
    ("train", ["analysis=train", "dataset=text", "model=cnn"], "model=gpt_tiny"),
    ("train", ["analysis=train", "dataset=digits", "model=gpt_tiny"], "dataset=text"),
    ("train", ["analysis=train", *DIGITS, "analysis.swa.enabled=true", "analysis.swa.start=400"], "analysis.swa.start"),
    ("train", ["analysis=train", *DIGITS, "analysis.swa.enabled=maybe"], "analysis.swa.enabled"),
    ("train", ["analysis=train", *DIGITS, "optimizer=custom"], "optimizer._target_"),
    ("train", ["analysis=train", *DIGITS, "optimizer=custom", "optimizer._target_=torch.optim.SGD",
               "+optimizer.momentum=inf"], "optimizer.momentum"),
    ("train", ["analysis=train", *DIGITS, "optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas"),
    ("train", ["analysis=train", *DIGITS, "+optimizer.lr_decay=0.1"], "optimizer.lr_decay"),
    ("train", ["analysis=train", *DIGITS, "+analysis.epoch=3"], "did you mean analysis.epochs?"),
    # benchmark
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.repeats=0"], "analysis.repeats"),
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.checkpoint={missing}"], "analysis.checkpoint"),
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.peers=[pyhessian2]"], "analysis.peers"),
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.targets.hessian_ratio=inf"],
     "analysis.targets.hessian_ratio"),
    ("benchmark", ["analysis=benchmark", "dataset=wigner"], "dataset"),
    # theory
    ("theory", ["analysis=theory", "analysis.claim=thm9"], "analysis.claim"),
    ("theory", ["analysis=theory", "analysis.claim=thm1", "analysis.thm1.num_steps=0"], "analysis.thm1.num_steps"),
    ("theory", ["analysis=theory", "resume=true"], "resume"),
    ("theory", ["analysis=theory", "analysis.claim=thm1", "dataset.n=10", "analysis.thm1.num_steps=30"],
     "analysis.thm1.num_steps"),
    ("theory", ["analysis=theory", "analysis.table1.ratios=[0.5]"], "analysis.table1.ratios"),
    ("theory", ["analysis=theory", "analysis.table1.empirical_dim=10", "analysis.table1.empirical_steps=20"],
     "analysis.table1.empirical_steps"),
    ("theory", ["analysis=theory", "analysis.claim=lemma1", "analysis.lemma1.sizes=[1]"], "analysis.lemma1.sizes"),
    # kernel smoothing
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.spectrum_file={missing}"], "analysis.spectrum_file"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.spectrum_file={not_npz}"], "analysis.spectrum_file"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.sigmas=[-1]"], "analysis.sigmas"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.sigmas=[]", "analysis.scaled_variances=[]"],
     "analysis.sigmas"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "dataset.n=10", "analysis.num_steps=30"], "analysis.num_steps"),
    # weight ESD
    ("weight_esd", ["analysis=weight_esd", "dataset=digits", "model=cnn", "analysis.checkpoint={other_ckpt}"],
     "checkpoint"),
    ("weight_esd", ["analysis=weight_esd", *DIGITS, "analysis.checkpoints_dir={missing}"], "analysis.checkpoints_dir"),
    ("weight_esd", ["analysis=weight_esd", *DIGITS, "analysis.alpha_low=3", "analysis.alpha_high=2"],
     "analysis.alpha_high"),
    # diagonal
    ("diagonal", ["analysis=diagonal", "analysis.method=magic"], "analysis.method"),
    ("diagonal", ["analysis=diagonal", "analysis.num_samples=zero"], "analysis.num_samples"),
    ("diagonal", ["analysis=diagonal", *CNN, "analysis.checkpoint={other_ckpt}"], "does not fit"),
    ("diagonal", ["analysis=diagonal", *DIGITS, "operator.label_smoothing=0.1"], "operator.loss"),
    ("diagonal", ["analysis=diagonal", "analysis.method=mc_ggn"], "analysis.method"),
    ("diagonal", ["analysis=diagonal", "analysis.checks=[fastest]"], "analysis.checks"),
    ("diagonal", ["analysis=diagonal", *DIGITS, "analysis.method=adam"], "analysis.checkpoint"),
    # landscape
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.num_points=-3"], "analysis.num_points"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.ritz_vectors_file={missing}"],
     "analysis.ritz_vectors_file"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.positions=[100]"], "analysis.positions"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.positions=[-21]"], "analysis.positions"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.num_steps=3", "analysis.positions=[3]"],
     "analysis.positions"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.positions=[top]"], "analysis.positions"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.positions=[]"], "analysis.positions"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.dist=inf"], "analysis.dist"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.spectrum_dir={missing}"], "analysis.spectrum_dir"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.require_spectrum=true"], "analysis.spectrum_dir"),
    ("landscape", ["analysis=landscape", *DIGITS, "+analysis.operators=[ggn,hessian]"], "analysis.operators"),
    # loss statistics
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.checkpoint_dir={missing}"], "analysis.checkpoint_dir"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.batch_size=-2"], "analysis.batch_size"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.checkpoints=[{missing}]"], "analysis.checkpoints"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.checkpoint={missing}",
                    "analysis.checkpoint_dir={ckpt_dir}"], "analysis.checkpoint"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.checkpoints=[]"], "analysis.checkpoints"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "+analysis.operators=[ggn,hessian]"], "analysis.operators"),
]

# --- rows derived from the yaml files: a bad value per key, by its rule ---------------------------------
#: A minimal config selecting each analysis (the schema is checked first, so the rest need only compose).
BASES = {"spectrum": [], "train": DIGITS, "benchmark": DIGITS, "theory": [], "kernel_smoothing": [],
         "weight_esd": CNN, "diagonal": [], "landscape": DIGITS, "loss_stats": DIGITS}
GROUP_BASES = {"dataset": [], "model": ["dataset=digits"], "operator": DIGITS,
               "optimizer": ["analysis=train", *DIGITS], "logger": []}
#: Bad values of the explicit rules (experiments/schema.py RULES), beyond the type of the default.
RANGE_VALUES = {schema.POSITIVE_INT: ["0"], schema.COUNT: ["-1"], schema.POSITIVE: ["-1"],
                schema.PROBABILITY: ["1.5"], schema.NONNEGATIVE: ["-0.5"]}


def _bad_values(key: str, default, option: str) -> list[str]:
    """Values the schema must refuse for ``key``: a wrong type (by its default) and, where a range rule
    applies, a value out of range."""
    if isinstance(default, str) and "${" in default:
        return []
    rule = schema.rule_for(key, default, option)
    if rule is None:
        return []
    if isinstance(default, bool):
        values = ["maybe"]
    elif isinstance(default, int):
        values = ["1.5"]
    elif isinstance(default, float):
        values = ["inf"]
    elif isinstance(default, list):
        values = ["[[1]]" if default and isinstance(default[0], str) else "[x]"] if default else ["7"]
    elif isinstance(default, str):
        values = ["bogus_value"] if "one of" in rule.text else ["[1]"]
    elif default is None:
        values = ["{{a: 1}}"]
    else:
        return []
    values = RANGE_VALUES.get(rule, [])[:1] + values   # one value a key: out of range where a range applies
    return [v for v in values if rule.check(_parse(v)) is not None][:1]


def _parse(text: str):
    """Enough of Hydra's value grammar for the values above."""
    if text in ("maybe", "bogus_value"):
        return text
    if text == "{{a: 1}}":
        return {"a": 1}
    if text.startswith("["):
        return json.loads(text.replace("x", '"x"'))
    return float(text) if any(c in text for c in ".ie") else int(text)


def _leaves(prefix: str, node: dict):
    for key, value in node.items():
        if key in ("name", "_target_") or (prefix == "operator" and key == "loss"):
            continue
        if isinstance(value, dict):
            yield from _leaves(f"{prefix}.{key}", value)
        else:
            yield f"{prefix}.{key}", value


def _derived_rows() -> list[tuple]:
    rows, seen = [], set()
    for name, option in sorted(schema.options("analysis").items()):
        base = [f"analysis={name}", *BASES.get(name, DIGITS)]
        label = "spectrum_matrix" if name == "spectrum" else name
        same = set()      # one row per nested mapping, rule and value (analysis.tolerances.* share one)
        for key, default in _leaves("analysis", option.defaults):
            for value in _bad_values(key, default, name):
                nest = (key.rsplit(".", 1)[0], id(schema.rule_for(key, default, name)), value)
                if key.count(".") < 2 or nest not in same:
                    same.add(nest)
                    rows.append((label, [*base, f"{key}={value}"], key))
        rows.append((label, [*base, f"+analysis.{next(iter(k for k in option.defaults if k != 'name'))}x=1"],
                     "unknown key"))
    for group, base in GROUP_BASES.items():
        for name, option in sorted(schema.options(group).items()):
            if (group, name) in schema.OPEN_OPTIONS:
                continue
            file = next((f for f in option.files if f.endswith(f"/{name}.yaml")), option.files[0])
            file = file.removeprefix(f"conf/{group}/").removesuffix(".yaml")
            for key, default in _leaves(group, option.defaults):
                for value in _bad_values(key, default, name):
                    if (key, value) in seen:        # the same key and value of another option: once is enough
                        continue
                    seen.add((key, value))
                    rows.append((f"{group}:{name}", [*base, f"{group}={file}", f"{key}={value}"], key))
    root = {k: v for k, v in schema.root_defaults().items() if k not in ("defaults", "output_dir", "run_name")}
    for key, default in root.items():
        for value in _bad_values(key, default, None):
            rows.append(("root", [f"{key}={value}"], key))
    return rows


ROWS = [*HAND_ROWS, *_derived_rows()]
IDS = [f"{i:03d}-{row[0]}-{row[1][-1].split('=')[0].lstrip('+')}" for i, row in enumerate(ROWS)]
DERIVED_IDS = IDS[len(HAND_ROWS):]
#: through the real CLI: every hand-written row, and the first derived row of each label
CLI_IDS = [*IDS[:len(HAND_ROWS)],
           *{ROWS[IDS.index(i)][0]: i for i in reversed(DERIVED_IDS)}.values()]


#: one xdist worker runs the whole module (under ``pytest --dist loadgroup``), so its module fixtures
#: are built once, not once per worker
pytestmark = pytest.mark.xdist_group("bad_input")


@pytest.fixture(scope="module")
def files(tmp_path_factory, fake_cifar10):
    root = tmp_path_factory.mktemp("bad_input")
    corrupt = root / "corrupt"
    shutil.copytree(fake_cifar10, corrupt)
    (batch,) = corrupt.rglob("data_batch_1")
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])   # a truncated download
    other = root / "checkpoint-00001.pt"     # a checkpoint of another model (an MLP, not the CNN)
    torch.manual_seed(0)
    save_checkpoint(other, {"model": torch.nn.Sequential(torch.nn.Linear(64, 8)).state_dict(), "epoch": 1})
    plain = root / "a_file"
    plain.write_text("not a folder")
    not_npz = root / "arrays.npz"
    not_npz.write_text("not a zip archive")
    return {"corrupt": corrupt, "other_ckpt": other, "missing": root / "does-not-exist", "file": plain,
            "ckpt_dir": root, "not_npz": not_npz}


@pytest.fixture(scope="module")
def table(files, tmp_path_factory):
    """Run every row through the CLI (tests/cli_batch.py); its results by row id, and the run folders."""
    root = tmp_path_factory.mktemp("cli_table")
    rows = [{"id": row_id, "args": [*(o.format(**files) for o in overrides),
                                    *([] if any(o.startswith("logger=") for o in overrides) else ["logger=none"])],
             "dir": str(root / row_id)} for row_id, (_, overrides, _) in zip(IDS, ROWS) if row_id in CLI_IDS]
    (root / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    subprocess.run([sys.executable, "-m", "tests.cli_batch", str(root / "rows.json"), str(root / "results.json"),
                    "--jobs", "2"], cwd=ROOT, env=env, check=True, timeout=1200)
    results = json.loads((root / "results.json").read_text())
    print(f"\nbad-input table: {len(rows)} rows through the CLI in {results['wall_time_s']:.1f} s")
    return {"root": root, **results}


def test_the_table_covers_every_analysis():
    counts = Counter(row[0].split(":")[0] for row in ROWS)
    assert len(ROWS) >= 250, len(ROWS)
    analyses = {p.stem for p in (ROOT / "conf" / "analysis").glob("*.yaml")} - {"spectrum"}
    for name in analyses | {"spectrum_matrix", "spectrum_network", "blocks"}:
        assert counts[name] >= 3, (name, counts)


@pytest.mark.parametrize("row_id", CLI_IDS)
def test_cli_bad_input_is_one_line_and_exit_2(row_id, table):
    analysis, overrides, names = ROWS[IDS.index(row_id)]
    got = table["rows"][row_id]
    lines = [line for line in got["stderr"].splitlines() if line.strip()]
    assert got["status"] == 2, got
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], got["stderr"][-2000:]
    folder = table["root"] / row_id
    assert not (folder / "results.json").exists() and not (folder / "results.partial.json").exists()
    assert not list(folder.glob("*.npz")) and not list(folder.glob("*.png"))


def test_the_cli_table_runs_each_label_and_every_hand_written_row():
    assert set(CLI_IDS) >= set(IDS[:len(HAND_ROWS)]) and len(set(CLI_IDS)) == len(CLI_IDS)
    assert {ROWS[IDS.index(i)][0] for i in CLI_IDS} == {row[0] for row in ROWS}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """The composed config of each derived row's overrides but its last (34 bases for ~280 rows)."""
    root, cache = tmp_path_factory.mktemp("composed"), {}

    def get(overrides: tuple[str, ...]):
        if overrides not in cache:
            cache[overrides] = make_cfg(root / str(len(cache)), list(overrides))
        return copy.deepcopy(cache[overrides])
    return get


@pytest.mark.parametrize("row_id", DERIVED_IDS)
def test_schema_refuses_every_derived_row_in_one_line(row_id, composed):
    """The last override applied by Hydra's own code (what ``compose`` does after merging the defaults;
    the result equals composing all overrides at once), then the CLI's first check and its error line."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    _, overrides, names = ROWS[IDS.index(row_id)]
    overrides = [o.format() for o in overrides]
    cfg = composed(tuple(overrides[:-1]))
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(overrides[-1:]), cfg)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    line, code = harness.describe(refused.value, cfg, None)
    assert code == 2 and line.startswith("error: ") and "\n" not in line and names in line, line


# Through dispatch in-process: a user-set output_dir (the CLI always uses Hydra's run folder).
def test_output_dir_inside_a_file(files, tmp_path):
    cfg = make_cfg(tmp_path / "run", MATRIX)
    cfg.output_dir = f"{files['file']}/sub"
    with pytest.raises(SuiteError, match="output_dir"):
        dispatch(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SuiteError, match="output_dir"):
            dispatch(make_cfg(folder / "run", MATRIX))
    finally:
        folder.chmod(0o755)


def test_a_folder_with_results_is_not_overwritten_unless_overwrite_is_true(tmp_path):
    dispatch(make_cfg(tmp_path / "run", MATRIX))
    with pytest.raises(SuiteError, match="overwrite=true"):
        dispatch(make_cfg(tmp_path / "run", MATRIX))
    with pytest.raises(SuiteError, match="overwrite='no'"):
        dispatch(make_cfg(tmp_path / "run", [*MATRIX, "overwrite=no"]))
    assert dispatch(make_cfg(tmp_path / "run", [*MATRIX, "overwrite=true"]))["analysis"] == "spectrum"


def test_the_determinism_check_refuses_non_finite_products_instead_of_a_nan_tolerance():
    from curvature.errors import NumericalError
    from curvature.operators import make_operator, mse_loss
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[2].weight.fill_(1e200)        # finite, but the first layer's curvature (~ w^2) overflows
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))]
    with pytest.raises(NumericalError, match="not finite"):   # was: a NaN atol and "the model is random"
        make_operator("hessian", model, mse_loss, data, check_deterministic=True, layerwise=False)


def test_loss_stats_over_one_batch_notes_that_variances_need_two(tmp_path):
    results = dispatch(make_cfg(tmp_path / "run", ["analysis=loss_stats", *DIGITS, "analysis.batch_size=512"]))
    row = results["tables"]["loss_stats"][0]
    assert row["num_batches"] == 1 and np.isnan(row["loss_variance"]) and np.isnan(row["gradient_variance"])
    assert any("2 batches" in note for note in results["notes"])
    assert np.isfinite(row["loss_mean"])
