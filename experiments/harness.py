"""What the command line does with an error: one line on stderr, the traceback in a file.

* Bad input (a ``SuiteError``, a config that does not compose or resolve, a run folder that cannot be
  written, memory or disk too small for the request): ``error: ...``, exit status 2. An error raised in
  the user's own code (``model=custom`` and the like) is bad input too: the line names the module and
  the first frame of that code (``file:line``), the traceback goes to ``error.log``.
* Anything else is a bug: ``internal error: <type>: <message> (full traceback in <run folder>/error.log)``,
  exit status 3; a temporary file takes the traceback when the run folder is unusable.

:func:`cli` wraps the ``@hydra.main`` function (Hydra's own errors: unknown group options and keys,
unparsable overrides, unresolvable interpolations, an unwritable ``hydra.run.dir``); :func:`run_task`
runs the analysis inside it. ``HYDRA_FULL_ERROR=1`` lets Hydra's errors through unchanged.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import errno
import os
import re
import sys
import sysconfig
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from curvature.errors import SuiteError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ERROR_LOG = "error.log"
#: The suite's own code: an error raised here (and not in the user's code) is a bug of the suite.
SUITE_DIRS = tuple(str(PROJECT_ROOT / d) + os.sep for d in ("curvature", "experiments", "paper_figures"))
_LIBRARY_DIRS = tuple({str(Path(p).resolve()) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                       if (p := sysconfig.get_paths().get(key))} |
                      {str(Path(sys.base_prefix).resolve()) + os.sep, str(Path(sys.prefix).resolve()) + os.sep})
#: Keys that set the size of the work, per dataset kind: what an out-of-memory line tells to reduce.
SIZE_KEYS = {"matrix": ("dataset.n", "analysis.num_vectors"),
             "other": ("operator.batch_size", "analysis.batch_size", "dataset.num_subsamples",
                       "analysis.num_vectors")}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# --- inside the Hydra job ---------------------------------------------------------------------
def run_task(cfg: DictConfig, dispatch: Callable[[DictConfig], dict],
             summary: Callable[[DictConfig, dict], None] | None = None) -> int:
    """Run ``dispatch(cfg)``; print ``summary`` or one error line. Returns the exit status."""
    out_dir = OmegaConf.select(cfg, "output_dir", default=None)
    try:
        results = dispatch(cfg)
    except KeyboardInterrupt as error:
        partial = getattr(error, "partial_results", None)
        _emit("interrupted (Ctrl-C): no results.json written" +
              (f"; what completed is in {partial}" if partial else ""), out_dir)
        return 130
    except Exception as error:  # noqa: BLE001 - the point: nothing leaves as a traceback
        from experiments.run_folder import FolderBusyError
        line, code = describe(error, cfg, out_dir)
        _emit(line, None if isinstance(error, FolderBusyError) else out_dir)  # not into the owner's log
        return code
    if summary is not None:
        summary(cfg, results)
    return 0


def describe(error: BaseException, cfg: DictConfig | None, out_dir: str | os.PathLike | None) -> tuple[str, int]:
    """The one line the user sees for ``error`` and the exit status (2 bad input, 3 a bug)."""
    partial = getattr(error, "partial_results", None)
    tail = f"; what completed is in {partial}" if partial else ""
    if isinstance(error, SuiteError):
        user = user_frame(error.__cause__) if error.__cause__ is not None else None
        if user:  # e.g. the suite's pre-flight product caught the user's model failing: say where
            frame, module, _ = user
            log = write_error_log(error, out_dir)
            return (f"error: {_one_line(error)} (raised at {frame.filename}:{frame.lineno} in {frame.name}, "
                    f"module {module}{_custom_targets(cfg)}; full traceback in {log})"), 2
        return f"error: {_one_line(error)}", 2
    config = _config_error(error) or _unimportable_target(error, cfg)
    if config:
        return f"error: {config}", 2
    if _out_of_memory(error):
        return f"error: out of memory ({_memory_detail(error)}): {_reduce_hint(cfg)}{tail}", 2
    if isinstance(error, OSError) and error.errno in _FULL:
        where = f" while writing {error.filename}" if error.filename else ""
        return (f"error: no space left on the device{where} ({error.strerror}): free some space or write "
                f"elsewhere (hydra.run.dir=<folder on another disk>){tail}"), 2
    log = write_error_log(error, out_dir)
    user = user_frame(error)
    if user:
        frame, module, raised = user
        target = _custom_targets(cfg)
        return (f"error: your code raised {type(raised).__name__}: {_one_line(raised, 300)} at "
                f"{frame.filename}:{frame.lineno} (in {frame.name}, module {module}{target}; full "
                f"traceback in {log}{tail})"), 2
    return f"internal error: {type(error).__name__}: {_one_line(error, 300)} (full traceback in {log}{tail})", 3


def _emit(line: str, out_dir) -> None:
    print(line, file=sys.stderr, flush=True)
    if out_dir:  # run.log ends with the same line (appended: Hydra's handler has the file open too)
        try:
            stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
            with open(Path(out_dir) / "run.log", "a") as handle:
                handle.write(f"[{stamp}][experiments.harness][ERROR] - {line}\n")
        except OSError:
            pass


def _one_line(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_error_log(error: BaseException, out_dir) -> str:
    """Append the full traceback to ``<out_dir>/error.log``, or to a temporary file when the folder is
    unusable; return the path written."""
    text = (f"--- {_dt.datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: "
            f"{' '.join(sys.argv)}\n" + "".join(traceback.format_exception(error)) + "\n")
    if out_dir:
        path = Path(out_dir) / ERROR_LOG
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(text)
            return str(path)
        except OSError:
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="deep-curvature-error-", suffix=".log")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return name
    except OSError:
        return "<nowhere: the run folder and the temporary folder are unwritable>"


# --- classifying --------------------------------------------------------------------------------
def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_user_file(filename: str) -> bool:
    if not filename or filename.startswith("<"):
        return False
    path = str(Path(filename).resolve())
    return not path.startswith(SUITE_DIRS) and not path.startswith(_LIBRARY_DIRS)


def user_frame(error: BaseException):
    """The deepest frame of the user's own code in the traceback (chained errors included): its
    ``FrameSummary``, its module name and the exception it belongs to; None when there is none."""
    for exc in _chain(error):
        found = None
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if _is_user_file(code.co_filename):
                found = (traceback.FrameSummary(code.co_filename, tb.tb_lineno, code.co_name, lookup_line=False),
                         tb.tb_frame.f_globals.get("__name__", "?"))
            tb = tb.tb_next
        if found:
            return (*found, error)
    return None


def _custom_targets(cfg) -> str:
    if cfg is None:
        return ""
    found = []
    for group in ("model", "optimizer"):
        target = OmegaConf.select(cfg, f"{group}._target_", default=None, throw_on_missing=False)
        if isinstance(target, str) and OmegaConf.select(cfg, f"{group}.name", default=None) == "custom":
            found.append(f"{group}._target_={target}")
    return f", {', '.join(found)}" if found else ""


def _config_error(error: BaseException) -> str | None:
    """A config value that cannot be resolved or is missing: the key and why."""
    from omegaconf.errors import (GrammarParseError, InterpolationResolutionError,
                                  MissingMandatoryValue)
    if isinstance(error, (InterpolationResolutionError, GrammarParseError, MissingMandatoryValue)):
        key = getattr(error, "full_key", None) or "?"
        reason = _one_line(re.split(r"\s*full_key:", str(error))[0], 300)
        return f"config key {key} cannot be resolved: {reason}; fix its value (e.g. {key}=<value>)"
    return None


TARGET_EXAMPLES = {"model": "curvature.models.small.MLP", "optimizer": "torch.optim.RMSprop"}


def _unimportable_target(error: BaseException, cfg) -> str | None:
    """An ImportError / AttributeError about a ``_target_`` of the config: that key, as bad input."""
    if cfg is None or not isinstance(error, (ImportError, AttributeError)):
        return None
    try:
        tree = OmegaConf.to_container(cfg, resolve=False)
    except Exception:  # noqa: BLE001
        return None
    targets = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif k == "_target_" and isinstance(v, str):
                targets.append((f"{prefix}{k}", v))
    walk(tree, "")
    name = getattr(error, "name", None)
    for key, target in targets:
        parts = target.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if name and (name in prefixes or name == parts[-1]):
            group = key.split(".")[0]
            example = TARGET_EXAMPLES.get(group, "<package.module.Class>")
            return (f"config key {key}={target!r} is invalid: cannot be imported ({type(error).__name__}: "
                    f"{_one_line(error, 200)}); give the import path of a class on the Python path, e.g. "
                    f"{key}={example}")
    return None


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "std::bad_alloc", "not enough memory"))


def _memory_detail(error: BaseException) -> str:
    match = re.search(r"allocate (\d+) bytes", str(error))
    if match:
        size, unit = float(match.group(1)), "B"
        for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
            if size < 1024:
                break
            size /= 1024
        return f"{type(error).__name__}: tried to allocate {size:.3g} {unit}"
    return f"{type(error).__name__}: {_one_line(error, 160)}"


def _reduce_hint(cfg) -> str:
    if cfg is None:
        return "reduce the size of the problem"
    kind = "matrix" if OmegaConf.select(cfg, "dataset.kind", default=None) == "matrix" else "other"
    parts = []
    for key in SIZE_KEYS[kind]:
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an unresolvable value is just not shown
            continue
        if isinstance(value, int) and not isinstance(value, bool) and (key != "analysis.num_vectors" or value > 1):
            parts.append(f"{key} (now {value})")
    return "reduce " + " or ".join(parts) if parts else "reduce the size of the problem"


# --- around Hydra ---------------------------------------------------------------------------------
def cli(hydra_main: Callable[[], Any], config_name: str = "config") -> None:
    """Call the ``@hydra.main`` function; turn what Hydra raises before (or around) the job into one
    line or one short paragraph. Exits with 2 (bad input) or 3 (a bug)."""
    busy = _busy_run_dir(sys.argv[1:]) or _glob_of_values(sys.argv[1:])
    if busy:  # before Hydra writes .hydra/ into the folder of the run that owns it
        print(f"error: {busy}", file=sys.stderr, flush=True)
        sys.exit(2)
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        hydra_main()
    except Exception as error:  # noqa: BLE001
        if user_full_error:
            raise
        text, code = describe_hydra(error, config_name)
        print(text, file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def _busy_run_dir(args: list[str]) -> str | None:
    """A single run given an explicit ``hydra.run.dir`` that a live run holds: the one-line refusal.
    (The run itself claims the folder; this only spares the owner's ``.hydra/`` from being rewritten.)"""
    from experiments.run_folder import busy_message, live_owner
    if any(a in ("-m", "--multirun") for a in args):
        return None
    dirs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
    if not dirs or "${" in dirs[-1]:
        return None
    folder = Path(dirs[-1].strip("'\"")).absolute()
    owner = live_owner(folder)
    return busy_message(folder, owner) if owner else None


def _glob_of_values(args: list[str]) -> str | None:
    """A multirun ``key=glob(...)`` on a key that is not a config group: the one-line refusal. Hydra's
    glob() sweep filters the option names of a config group (conf/<group>/*.yaml), never files, so on
    any other key it matches nothing and Hydra launches 0 jobs and exits 0."""
    if not any(a in ("-m", "--multirun") for a in args):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from experiments.config_source import config_dir
    for arg in args:
        if "glob(" not in arg:
            continue
        try:
            override = OverridesParser.create().parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports its own parse errors
            continue
        key = override.key_or_group
        if isinstance(override.value(), Glob) and not (config_dir() / key).is_dir():
            fix = ("analysis.checkpoint=<folder> (one run: every checkpoint-XXXXX.pt in it, in epoch order)"
                   if key == "analysis.checkpoint" else f"{key}=<a>,<b>,<c> (the values, comma-separated)")
            return (f"{arg}: Hydra's glob() sweeps the option names of a config group, not files, and {key} is "
                    f"not a group: it would launch 0 jobs; give {fix}")
    return None


def describe_hydra(error: BaseException, config_name: str = "config") -> tuple[str, int]:
    """The short report of an error raised by Hydra while composing the config or setting up the
    job (before the analysis starts), and the exit status."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError

    if isinstance(error, MissingConfigException):
        return _missing_option(error), 2
    if isinstance(error, OverrideParseException):
        return (f"error: cannot parse the override {error.override!r}: {_one_line(error.message, 300)}\n"
                "  write key=value or group=option; quote values holding spaces or brackets"), 2
    if isinstance(error, ConfigCompositionException):
        cause = error.__cause__
        match = re.match(r"Could not override '([^']+)'", str(error))
        if match and (isinstance(cause, ConfigKeyError) or "not in struct" in str(cause)):
            return _unknown_key(match.group(1), str(error), config_name), 2
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if cause is not None:
            lines.append(_one_line(cause, 300))
        return "error: " + "\n  ".join(lines[:4]), 2
    config = _config_error(error)
    if config:
        return f"error: {config}", 2
    if isinstance(error, OSError):
        where = error.filename or "the run folder"
        return (f"error: cannot write the run folder {where} ({error.strerror or error}): choose a writable "
                "folder with hydra.run.dir=<folder> (hydra.sweep.dir=<folder> with -m)"), 2
    if isinstance(error, SuiteError):
        return f"error: {_one_line(error)}", 2
    log = write_error_log(error, None)
    return f"internal error: {type(error).__name__}: {_one_line(error, 300)} (full traceback in {log})", 3


def _missing_option(error) -> str:
    missing = getattr(error, "missing_cfg_file", None) or ""
    options = list(getattr(error, "options", None) or [])
    text = str(error)
    if not options:
        block = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", text)
        options = [line.strip() for line in block.group(1).splitlines()] if block else []
    group, _, option = missing.rpartition("/")
    if not group or not options:
        return "error: " + "\n  ".join(line.strip() for line in text.splitlines()[:3] if line.strip())
    return (f"error: unknown option '{option}' for group {group} (Could not find '{missing}').\n"
            f"  Available options in '{group}': {', '.join(options)}\n"
            f"  choose one of them, e.g. {group}={options[0]}")


def _unknown_key(key: str, text: str, config_name: str) -> str:
    plus = re.search(r"use (\+\S+)", text)
    keys = _known_keys(config_name)
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.7)
    lines = [f"error: unknown config key {key}: the config has no such key."]
    owners = _options_with_key(key)
    if owners:
        group = key.split(".")[0]
        lines.append(f"  {group} options that have it: {', '.join(owners)}; e.g. {group}={owners[0]} {key}=<value>")
    elif close:
        lines.append(f"  did you mean {' or '.join((parent + '.' if parent else '') + c for c in close)}?")
    elif siblings:
        more = ", ..." if len(siblings) > 12 else ""
        lines.append(f"  keys of {parent or 'the root'}: {', '.join(siblings[:12])}{more}")
    lines.append(f"  To add a new key write {plus.group(1) if plus else '+' + key + '=<value>'}; "
                 "`python -m experiments.run --cfg job` prints every key")
    return "\n".join(lines)


def _options_with_key(key: str) -> list[str]:
    """The options of the key's group (``conf/<group>/*.yaml``) that define it, e.g. ``custom`` for
    ``model._target_``."""
    group, _, rest = key.partition(".")
    folder = PROJECT_ROOT / "conf" / group
    if not rest or not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # keeps ??? values
            for part in rest.split("."):
                node = node[part]
            found.append(path.stem)
        except Exception:  # noqa: BLE001 - not there (or not a mapping): only a suggestion
            continue
    return found


def _known_keys(config_name: str) -> list[str]:
    """Every dotted key of the config composed with the group choices of this command line (for
    suggestions); empty when that fails (or the config folder is not the checkout's conf/)."""
    conf = PROJECT_ROOT / "conf"
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        if GlobalHydra.instance().is_initialized() or not (conf / f"{config_name}.yaml").is_file():
            return []
        groups = [a for a in sys.argv[1:] if "=" in a and "." not in a.split("=")[0]
                  and not a.startswith(("+", "~", "-")) and "," not in a]
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name=config_name, overrides=groups), resolve=False)
    except Exception:  # noqa: BLE001 - only a suggestion
        return []
    keys: list[str] = []

    def walk(node, prefix):
        for k, v in node.items():
            keys.append(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
    walk(cfg, "")
    return keys
