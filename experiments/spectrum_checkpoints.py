"""``analysis=spectrum`` over the checkpoints of a training run: one command, one run folder, one figure.

    python -m experiments.run experiment=train_digits analysis.epochs=10 analysis.save_freq=1 \\
        hydra.run.dir=outputs/train_digits
    python -m experiments.run experiment=demo_spectrum analysis.checkpoint=outputs/train_digits
    python -m experiments.run experiment=demo_spectrum \\
        'analysis.checkpoint=[outputs/a/checkpoint-00005.pt,outputs/b]'      # files and folders, in order

``analysis.checkpoint`` names a folder (its ``checkpoint-XXXXX.pt`` in epoch order; ``checkpoint-swa.pt``
only when named as a file) or a list of files and folders (:func:`experiments.networks.checkpoint_files`).
The data, the model and the operators are set up once; each checkpoint's weights are loaded in turn
and each gets the Lanczos run of a single-checkpoint run of the same file (same batches, same start
vectors: the same Ritz values). Before any Lanczos work every checkpoint is read and loaded into the
model, so a file of another model fails at once, naming it.

Writes the table ``checkpoints`` (one row per checkpoint and operator: epoch, extreme Ritz values,
negative mass, normalised trace, exact top eigenvalue and W1 when computed), per checkpoint the arrays
``<label>_<operator>_<ritz_values|ritz_weights|tridiagonal|residual_bounds|mask>`` (``<label>`` the
file's stem, e.g. ``checkpoint-00003``; the suffixes of a single run's arrays) and metrics
``<operator>_<quantity>_<label>``, the ``cost`` table with a ``checkpoint`` column, and the figure
``spectrum_evolution`` (per operator: the stems per epoch as a heat map, the top eigenvalue and the
negative mass against epoch).

Resumable per checkpoint: a finished checkpoint's spectrum is saved as ``spectrum-done-<label>.pt`` and
its Lanczos states as ``lanczos-state-<label>-<operator>.pt``; ``resume=true`` skips the finished
checkpoints and continues the interrupted one from its state. Both kinds of file are deleted once
``results.json`` is in place.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from curvature import plotting
from curvature.errors import SuiteError
from curvature.io import torch_save_atomic
from curvature.lanczos import LanczosResult
from curvature.spectrum import SpectralMeasure
from curvature.training import load_checkpoint, load_model_state, read_checkpoint
from experiments import lanczos_state
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import CHECKPOINT_FILE
from experiments.runtime import Run
from experiments.spectrum_network import (_data_record, _exact_eigenvalues, build_operator, network_data,
                                          operator_checks, operator_spectrum, record_uncertainty)

log = logging.getLogger(__name__)
DONE_PREFIX = "spectrum-done-"
ARRAYS = ("tridiagonal", "ritz_values", "ritz_weights", "residual_bounds", "mask")
#: What a single-checkpoint run offers and a series does not (one checkpoint at a time: give a file).
SINGLE_ONLY = {"analysis.blocks": ("blocks", None), "analysis.save_ritz_vectors": ("save_ritz_vectors", False),
               "analysis.compare_vectors": ("compare_vectors", False)}


def validate_series(cfg: DictConfig, settings: dict) -> None:
    """The settings a series of checkpoints cannot take, as one-line errors."""
    for key, (name, off) in SINGLE_ONLY.items():
        if settings.get(name, off) not in (off, None):
            raise V.ConfigError(key, settings[name], "a folder or list in analysis.checkpoint runs the spectrum "
                                "only; give one checkpoint file for this", f"{key}={str(off).lower()}")
    if V.get(cfg, "distributed", False):
        raise V.ConfigError("distributed", True, "a folder or list in analysis.checkpoint runs in one process; "
                            "give one checkpoint file per distributed run", "distributed=false")
    settings["negative_band"] = V.number(cfg, "analysis.negative_band", 0, 1, example="analysis.negative_band=0.01")
    if settings["negative_band"] >= 1:
        raise V.ConfigError("analysis.negative_band", settings["negative_band"], "must be below 1 (a fraction of the "
                            "largest |Ritz value|)", "analysis.negative_band=0.01")


def negative_mass(measure: SpectralMeasure, band: float) -> float:
    """The stem weight below ``-band`` x the largest |Ritz value|: the negative mass that is not the
    stem standing for the bulk near 0."""
    radius = float(measure.nodes.abs().max())
    return float(measure.weights[measure.nodes < -band * radius].sum())


def series_labels(paths: list[str]) -> list[str]:
    """The checkpoints' names in file and array names: their stems, numbered when two share one."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:03d}-{stem}" for i, stem in enumerate(stems)]


def done_path(run: Run, label: str) -> Path:
    return run.out_dir / f"{DONE_PREFIX}{label}.pt"


def run_series(run: Run) -> dict:
    s = run.settings
    paths, names = s["checkpoints"], s["operator"]["names"]
    labels = series_labels(paths)
    states, done = _resume(run, s, paths, labels, names)  # before any work
    run.superseded_notes.add(f"weights: {s['checkpoint']}")  # network_data's note: said below for all
    model, data, batches = network_data(run, s)  # the first checkpoint's weights
    run.note(f"weights: {len(paths)} checkpoints in this order: {', '.join(paths)}")
    epochs = _check_series(paths, model)
    samples = _data_record(run, s, data, batches)
    run.metric("num_samples", len(data))
    run.metric("num_checkpoints", len(paths))
    loss_fn = build_loss(s["operator"])
    V.parameter_names(model, s["operator"]["params"])  # a glob list matching no parameter fails at once
    ops: dict = {}
    spectra = []
    for i, (path, label) in enumerate(zip(paths, labels)):
        if label in done:
            for note in done[label]["notes"]:
                run.note(note)
            run.note(f"{label}: finished before the resume, read from {done_path(run, label).name}")
            spectra.append(_unpack(done[label]["spectra"]))
            continue
        print(f"checkpoint {i + 1}/{len(paths)} (epoch {epochs[i]}): {path}", flush=True)
        log.info("checkpoint %d/%d: %s", i + 1, len(paths), path)
        load_checkpoint(path, model, map_location=run.device)
        model.to(dtype=run.dtype)
        first_note = len(run.notes)
        spectra.append(_spectra(run, s, label, model, loss_fn, batches, len(data), ops, states))
        _save_done(run, s, label, path, epochs[i], spectra[-1], run.notes[first_note:])
        lanczos_state.remove_states(run, [f"{label}-{name}" for name in names])
    _record(run, s, paths, labels, epochs, spectra, set(done))
    run.figure(_draw(s, labels, epochs, spectra), "spectrum_evolution")
    results = run.finish(lanczos={"num_steps": s["num_steps"], "num_vectors": s["num_vectors"],
                                  "engine": s["lanczos_engine"]},
                         operator={**s["operator"], "names": names},
                         checkpoints=[{"path": p, "label": k, "epoch": e} for p, k, e in zip(paths, labels, epochs)],
                         data=samples)
    for label in labels:
        done_path(run, label).unlink(missing_ok=True)
    return results


def _spectra(run: Run, s: dict, label: str, model, loss_fn, batches, num_samples: int, ops: dict,
             states: dict) -> dict:
    """Each operator's Lanczos run (and exact eigenvalues, as ``exact_max_dim`` says) at the loaded
    weights. The operators are built at the first checkpoint computed and reused: their products
    read the model's parameters, which each checkpoint overwrites in place."""
    out = {}
    for name in s["operator"]["names"]:
        if name not in ops:
            ops[name] = build_operator(run, s, name, model, loss_fn, batches)
        op = ops[name]
        op.clear_cache()  # the cached primal is of the previous weights (it would also notice)
        result, seconds, cost = operator_spectrum(run, s, name, op, num_samples, states, key=f"{label}-{name}",
                                                  label=f"{label}: ")
        exact, exact_cost = _exact_eigenvalues(run, s, name, op, seconds)
        op.clear_cache()  # the next operator's products need the memory, as in a single run
        out[name] = {"result": result, "exact": exact, "cost": {**cost, **exact_cost}}
    return out


def _check_series(paths: list[str], model) -> list:
    """Read every checkpoint and load it into ``model`` before any Lanczos work: a file of another model
    (or one trained with another model config than the first) is a one-line error naming it. Returns
    the epochs (the checkpoint's ``epoch`` entry, else its file name's number, else None)."""
    epochs, first = [], None
    for path in paths:
        state = read_checkpoint(path)
        load_model_state(path, model, state["model"])
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        trained = config.get("model")
        if trained is not None:
            if first is None:
                first = (path, trained)
            elif trained != first[1]:
                raise SuiteError(f"checkpoint {path} was trained with model {trained}, {first[0]} with "
                                 f"{first[1]}: one series takes the checkpoints of one model; run them separately")
        match = CHECKPOINT_FILE.fullmatch(Path(path).name)
        epoch = state.get("epoch")
        epochs.append(epoch if isinstance(epoch, int) else int(match[1]) if match else None)
    return epochs


# --- resume ------------------------------------------------------------------------------------
def _resume(run: Run, s: dict, paths: list[str], labels: list[str], names: list[str]) -> tuple[dict, dict]:
    """``resume=true``: the Lanczos states of the interrupted checkpoint and the saved spectra of the
    finished ones, each checked against this run's config and checkpoint file."""
    if run.resume is not True:
        return {}, {}
    state_names = [f"{label}-{name}" for label in labels for name in names]
    saved_states = [n for n in state_names if lanczos_state.state_path(run, n).is_file()]
    finished = [label for label in labels if done_path(run, label).is_file()]
    if not saved_states and not finished:
        raise V.ConfigError("resume", True, f"nothing to resume: no {DONE_PREFIX}<checkpoint>.pt or "
                            f"{lanczos_state.STATE_PREFIX}<checkpoint>-<operator>.pt of these checkpoints in "
                            f"{run.out_dir}", "hydra.run.dir=<the folder of the interrupted run>, or resume=null "
                            "to start afresh")
    states = lanczos_state.load_states(run, saved_states) if saved_states else {}
    ours, done = lanczos_state.fingerprint(run.config), {}
    for label in finished:
        path, checkpoint = done_path(run, label), paths[labels.index(label)]
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SuiteError(f"{path} is not a readable spectrum ({type(error).__name__}): delete it to compute "
                             "that checkpoint afresh") from None
        if not (isinstance(saved, dict) and isinstance(saved.get("fingerprint"), dict)):
            raise SuiteError(f"{path} holds no config fingerprint: not a spectrum of analysis=spectrum; delete it")
        lanczos_state.refuse_differences(ours, saved["fingerprint"], path)
        if saved.get("num_steps") != s["num_steps"]:
            raise V.ConfigError("analysis.num_steps", s["num_steps"], f"{path.name} holds {saved.get('num_steps')} "
                                "Lanczos steps; a finished checkpoint is not recomputed",
                                f"analysis.num_steps={saved.get('num_steps')} (or resume=null to start afresh)")
        if list(saved.get("spectra", {})) != names:
            raise V.ConfigError("analysis.operators", names, f"{path.name} holds the spectra of "
                                f"{list(saved.get('spectra', {}))}; a finished checkpoint is not recomputed",
                                f"analysis.operators={list(saved.get('spectra', {}))} (or resume=null to start afresh)")
        if saved.get("checkpoint") != checkpoint:
            raise SuiteError(f"{path} is the spectrum of {saved.get('checkpoint')}, not of {checkpoint}: the "
                             "checkpoints changed since the interrupted run; delete it or start afresh (resume=null)")
        done[label] = saved
    return states, done


def _save_done(run: Run, s: dict, label: str, checkpoint: str, epoch, spectra: dict, notes: list[str]) -> None:
    packed = {}
    for name, spectrum in spectra.items():
        fields = {f.name: getattr(spectrum["result"], f.name) for f in dataclasses.fields(LanczosResult)
                  if f.name not in ("ritz_vectors", "basis", "notes")}
        packed[name] = {"result": fields, "exact": spectrum["exact"], "cost": spectrum["cost"]}
    torch_save_atomic(done_path(run, label), {
        "checkpoint": checkpoint, "epoch": epoch, "num_steps": s["num_steps"], "spectra": packed,
        "notes": list(notes), "fingerprint": lanczos_state.fingerprint(run.config)})


def _unpack(packed: dict) -> dict:
    return {name: {"result": LanczosResult(**spectrum["result"]), "exact": spectrum["exact"],
                   "cost": spectrum["cost"]} for name, spectrum in packed.items()}


# --- results -----------------------------------------------------------------------------------
def _record(run: Run, s: dict, paths, labels, epochs, spectra, resumed: set) -> None:
    rows, cost, errors = [], [], []
    zero_node = s["tolerances"]["zero_node"]
    run.array("checkpoint_epochs", np.array([np.nan if e is None else e for e in epochs], dtype=float))
    for path, label, epoch, by_operator in zip(paths, labels, epochs, spectra):
        for name, spectrum in by_operator.items():
            result, exact = spectrum["result"], spectrum["exact"]
            measure = SpectralMeasure.from_lanczos(result)
            summary = measure.summary()
            for key in ARRAYS:
                run.array(f"{label}_{name}_{key}", getattr(result, key))
            for key, value in summary.items():
                run.metric(f"{name}_{key}_{label}", value)
            run.metric(f"{name}_negative_mass_{label}", negative_mass(measure, s["negative_band"]))
            operator_checks(run, s, name, measure, exact, suffix=f"_{label}")
            row = {"checkpoint": path, "label": label, "epoch": epoch, "operator": name,
                   "lanczos_steps": int(result.num_steps.max()), **summary,
                   "negative_mass": negative_mass(measure, s["negative_band"]),
                   "exact_max_eigenvalue": None, "wasserstein_to_exact": None,
                   "seconds": spectrum["cost"]["seconds_total"], "resumed": label in resumed}
            if exact is not None:
                run.array(f"{label}_{name}_exact_eigenvalues", exact)
                row.update(exact_max_eigenvalue=float(exact.max()), wasserstein_to_exact=measure.wasserstein(exact))
            rows.append(row)
            cost.append({"checkpoint": label, **spectrum["cost"]})
            errors += record_uncertainty(run, result, zero_node, prefix=f"{name}_", suffix=f"_{label}",
                                         label=f"{name}: ", checkpoint=label, operator=name)
    run.metric("num_params", cost[0]["num_params"])
    run.table("checkpoints", rows)
    run.table("cost", cost)
    if errors:
        run.table("uncertainty", errors)


def _draw(s: dict, labels, epochs, spectra):
    """Per operator: the stem weight per eigenvalue bin and checkpoint (log colour), the top eigenvalue
    and the negative mass against epoch; the first and last values in the titles."""
    by_epoch = all(isinstance(e, int) for e in epochs) and all(a < b for a, b in zip(epochs, epochs[1:]))
    x = np.array(epochs if by_epoch else range(1, len(labels) + 1), dtype=float)
    xlabel = "epoch" if by_epoch else "checkpoint (in the order given)"
    names = list(spectra[0])
    fig, axes = plotting.panel_grid(3 * len(names), columns=3)
    for row, name in enumerate(names):
        measures = [SpectralMeasure.from_lanczos(by_operator[name]["result"]) for by_operator in spectra]
        top = np.array([float(m.nodes.max()) for m in measures])
        negative = np.array([negative_mass(m, s["negative_band"]) for m in measures])
        below_zero = np.array([m.summary()["negative_weight"] for m in measures])
        heat, top_ax, neg_ax = axes[3 * row: 3 * row + 3]
        plotting.stem_heatmap(heat, x, [(m.nodes, m.weights) for m in measures], bins=s["histogram_bins"],
                              xlabel=xlabel, title=f"{name}: Lanczos stems, m={s['num_steps']}, "
                                                   f"{s['num_vectors']} vector(s)")
        plotting.series(top_ax, x, top, xlabel=xlabel, ylabel="top Ritz value",
                        title=f"{name}: top eigenvalue {top[0]:.3g} -> {top[-1]:.3g}")
        plotting.series(neg_ax, x, below_zero, xlabel=xlabel, color="silver", label="every stem < 0")
        plotting.series(neg_ax, x, negative, xlabel=xlabel, ylabel="stem weight", color="tab:purple",
                        label=f"stems < -{s['negative_band']:g} x max |Ritz|",
                        title=f"{name}: negative mass {negative[0]:.3g} -> {negative[-1]:.3g}")
    fig.tight_layout()
    return fig
