"""The ``flax-linoss`` command line (also ``python -m flax_linoss``), in the Flax-examples way.

Every subcommand and flag is described in :data:`HELP` (``flax-linoss --help``,
``flax-linoss COMMAND --help``). A mistake a user makes (a bad config key or value, a missing
data folder or workdir, an incompatible checkpoint, a NaN loss, more devices asked for than
exist) is one line on stderr and exit status 1; ``--traceback`` (or ``--verbosity=1``) shows
the traceback instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time

from flax_linoss.train import default_config

DEFAULT_CONFIG = default_config.__file__

# command -> (summary, usage, example)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "train a model, or resume the run in --workdir",
        "flax-linoss train [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [--workdir=DIR]",
        "flax-linoss train --config=configs/uea_scp1.py:linoss_im --workdir=runs/scp1",
    ),
    "eval": (
        "evaluate a run's best (or latest) checkpoint on val and test",
        "flax-linoss eval --workdir=DIR [--which=best|latest] [--config=...] "
        "[--config.KEY=VALUE ...]",
        "flax-linoss eval --workdir=runs/scp1 --which=latest",
    ),
    "plot": (
        "draw a run's curves (or each seed's validation curve of a reproduction) to a PNG",
        "flax-linoss plot WORKDIR [--out=PNG]",
        "flax-linoss plot runs/scp1",
    ),
    "reproduce": (
        "run the papers' protocol for several seeds and write results.json / results.md",
        "flax-linoss reproduce --config=FILE[:ARG] --workdir=DIR [--seeds=S1,S2,...] "
        "[--max_steps=N] [--eval_every=N] [--seed_parallel]",
        "flax-linoss reproduce --config=configs/uea_scp1.py:linoss_im "
        "--workdir=runs/repro-scp1-im --max_steps=1000 --eval_every=250",
    ),
    "config": (
        "print the resolved config, each field with its comment",
        "flax-linoss config [--config=FILE[:ARG]] [--config.KEY=VALUE ...]",
        "flax-linoss config --config=configs/uea_scp1.py:d_linoss --config.seed=3456",
    ),
    "doctor": (
        "print versions, devices, what scan='auto' picks here and why, the kernels' "
        "self-check and the data directory (for bug reports)",
        "flax-linoss doctor",
        "flax-linoss doctor",
    ),
}

FLAGS_HELP = """\
Flags:
  --config=FILE[:ARG]     an ml_collections config file (default: the built-in synthetic
                          default); ARG picks a variant, e.g. configs/uea_scp1.py:linoss_im
  --config.KEY=VALUE      override one field, e.g. --config.train.num_steps=500
                          (see every field: flax-linoss config [--config=...])
  --workdir=DIR           run folder: checkpoints, metrics.jsonl, tensorboard/, config.json
  --which=best|latest     eval: which checkpoint (default best)
  --out=PNG               plot: output path (default WORKDIR/curves.png)
  --seeds=S1,S2,...       reproduce: seeds (default the papers' 2345,3456,4567,5678,6789)
  --max_steps=N           reproduce: budget, at most N steps per seed
  --eval_every=N          reproduce: budget, evaluate (and checkpoint) every N steps
  --seed_parallel         reproduce: train all seeds as one compiled program
  --traceback             on an error, show the Python traceback (also --verbosity=1)
  --jax_*                 JAX's own flags, e.g. --jax_platforms=cpu

In the papers' configs one seed (--config.seed) drives the split, the initialisation,
dropout and the data order; --config.data.split_seed=S fixes the split separately."""


def help_text(command: str | None = None) -> str:
    """The help for ``command`` (or for the whole tool)."""
    if command in COMMANDS:
        summary, usage, example = COMMANDS[command]
        return f"flax-linoss {command}: {summary}\n\nUsage: {usage}\nExample: {example}\n\n" + (
            FLAGS_HELP
        )
    width = max(len(c) for c in COMMANDS)
    lines = [
        "flax-linoss: oscillatory state-space models (LinOSS, D-LinOSS) for Flax.",
        "",
        "Usage: flax-linoss COMMAND [flags]   (help on one: flax-linoss COMMAND --help)",
        "",
        "Commands:",
        *(f"  {c:<{width}}  {s}" for c, (s, _, _) in COMMANDS.items()),
        "",
        "Examples:",
        *(f"  {e}" for _, _, e in COMMANDS.values()),
        "",
        FLAGS_HELP,
    ]
    return "\n".join(lines) + "\n"


class UserError(Exception):
    """A mistake in the command line; printed as one line."""


# ----------------------------------------------------------------------------------------
# Config loading, checked before absl parses the flags (its own errors suggest nothing).


def load_config_file(spec: str):
    """The config of ``FILE[:ARG]`` (``get_config(ARG)`` or ``get_config()``)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise UserError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_flax_linoss_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # a user's file or argument: say which, in one line
        raise UserError(f"--config={spec}: {type(e).__name__}: {e}") from e


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for a in argv:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
        if m:
            keys.append(m.group(1))
    return keys


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def precheck(argv: list[str]) -> None:
    """Raises :class:`UserError` for a bad ``--config`` or an unknown ``--config.KEY``."""
    from flax_linoss.train.config import ConfigError, check_override_keys

    spec = _flag_value(argv, "config")
    config = load_config_file(spec) if spec else default_config.get_config()
    try:
        check_override_keys(config, _override_keys(argv))
    except ConfigError as e:
        raise UserError(str(e)) from None


def _saved_config(workdir: str, argv: list[str], parsed):
    """A run's ``config.json`` with the command line's typed overrides applied."""
    import ml_collections

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    for key in _override_keys(argv):
        node_new, node_old = parsed, config
        *parents, leaf = key.split(".")
        for p in parents:
            node_new, node_old = node_new[p], node_old[p]
        node_old[leaf] = node_new[leaf]
    return config


# ----------------------------------------------------------------------------------------
# `flax-linoss config`


def field_comments() -> dict[str, str]:
    """``{"train.num_steps": "Training steps (global batches)."}`` from the comments above
    each field in :mod:`flax_linoss.train.default_config`."""
    import inspect

    sections = {"config": "", "data": "data.", "model": "model.", "opt": "optimizer."}
    sections |= {"train": "train.", "par": "parallel."}
    out, pending = {}, []
    for line in inspect.getsource(default_config.get_config).splitlines():
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"^(\w+)\.(\w+)\s*=", text)
        if m and m.group(1) in sections:
            inline = text.split("#", 1)[1].strip() if "#" in text else ""
            out[sections[m.group(1)] + m.group(2)] = " ".join(pending) or inline
        pending = []
    return out


def config_text(config) -> str:
    """The resolved config, one ``key = value  # comment`` line per field."""
    from flax_linoss.train.config import flat_keys

    comments = field_comments()
    lines = []
    for key, value in flat_keys(config).items():
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        lines.append(f"{key} = {value!r}")
        if comments.get(key):
            lines[-1] += f"  # {comments[key]}"
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Commands.

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "ml_collections config file (FILE[:ARG]).", lock_config=True
    )
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run directory.")
    _FLAGS["which"] = flags.DEFINE_enum("which", "best", ["best", "latest"], "eval: checkpoint.")
    _FLAGS["out"] = flags.DEFINE_string("out", None, "plot: PNG path.")
    _FLAGS["seeds"] = flags.DEFINE_list("seeds", None, "reproduce: seeds.")
    _FLAGS["max_steps"] = flags.DEFINE_integer("max_steps", None, "reproduce: step budget.")
    _FLAGS["eval_every"] = flags.DEFINE_integer("eval_every", None, "reproduce: eval interval.")
    _FLAGS["seed_parallel"] = flags.DEFINE_bool("seed_parallel", False, "reproduce: one program.")
    _FLAGS["traceback"] = flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.")


def _workdir(command: str, required: bool = True) -> str | None:
    workdir = _FLAGS["workdir"].value
    if required and not workdir:
        raise UserError(f"flax-linoss {command} needs --workdir=DIR")
    return workdir


def _run_command(command: str, rest: list[str]) -> None:
    from flax_linoss.train import trainer

    if command == "config":
        print(config_text(_FLAGS["config"].value), end="")
    elif command == "plot":
        from flax_linoss.train.plots import plot_run

        workdir = rest[0] if rest else _workdir("plot")
        print(plot_run(workdir, _FLAGS["out"].value))
    elif command == "train":
        workdir = _workdir("train", required=False) or os.path.join(
            "runs", time.strftime("%Y%m%d-%H%M%S")
        )
        trainer.train_and_evaluate(_FLAGS["config"].value, workdir)
    elif command == "eval":
        workdir = _workdir("eval")
        if not os.path.isdir(workdir):
            raise UserError(f"--workdir={workdir} does not exist")
        saved = os.path.join(workdir, "config.json")
        if _flag_value(sys.argv, "config") is None and os.path.exists(saved):
            config = _saved_config(workdir, sys.argv, _FLAGS["config"].value)
        else:
            config = _FLAGS["config"].value
        trainer.evaluate(config, workdir, which=_FLAGS["which"].value)
    else:
        _reproduce()


def _reproduce() -> None:
    from flax_linoss.data.protocol import PAPER_SEEDS
    from flax_linoss.train.reproduce import reproduce

    workdir = _workdir("reproduce")
    try:
        seeds = [int(x) for x in (_FLAGS["seeds"].value or PAPER_SEEDS)]
    except ValueError:
        raise UserError(f"--seeds must be integers, got {_FLAGS['seeds'].value}") from None
    res = reproduce(
        _FLAGS["config"].value,
        workdir,
        seeds=seeds,
        max_steps=_FLAGS["max_steps"].value,
        eval_every=_FLAGS["eval_every"].value,
        seed_parallel=_FLAGS["seed_parallel"].value,
        command=" ".join(sys.argv),
    )
    print(
        f"{res['model']} on {res['dataset']}: test {res['metric']} "
        f"{res['test_mean']:.2f} +- {res['test_std']:.2f} over {len(seeds)} seeds; "
        f"{os.path.join(workdir, 'results.md')}"
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the user asked for something impossible."""
    from flax_linoss.data.errors import DataError
    from flax_linoss.train.checkpoint import IncompatibleCheckpointError
    from flax_linoss.train.config import ConfigError
    from flax_linoss.train.trainer import NonFiniteLossError

    return (
        UserError,
        ConfigError,
        DataError,
        IncompatibleCheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
    )


def _absl_main(argv: list[str]) -> None:
    from absl import logging

    command, rest = argv[1], argv[2:]
    if command != "plot" and rest:
        raise UserError(f"unexpected arguments {rest!r} (flags are written --name=value)")
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        _run_command(command, rest)
    except _user_errors() as e:
        if _show_traceback():
            raise
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _show_traceback() -> bool:
    argv = sys.argv
    verbose = any(re.match(r"^--(verbosity|v)=([1-9]|debug)", a) for a in argv)
    return "--traceback" in argv or verbose


def _fail(message: str) -> None:
    print(f"flax-linoss: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "flax-linoss"
    words = [a for a in argv[1:] if not a.startswith("-")]
    command = words[0] if words else None
    if command is None and not {"--help", "-h", "--helpshort"} & set(argv):
        print(help_text(), end="", file=sys.stderr)  # a usage error: no command
        sys.exit(2)
    if command == "help" or {"--help", "-h", "--helpshort"} & set(argv):
        target = words[1] if command == "help" and len(words) > 1 else command
        print(help_text(target if target in COMMANDS else None), end="")
        sys.exit(0)
    if command not in COMMANDS or argv[1] != command:
        _fail(f"unknown command {argv[1]!r}; commands: {', '.join(COMMANDS)} (--help)")
    if command == "doctor":
        if argv[2:]:
            _fail(f"doctor takes no arguments, got {argv[2:]!r}")
        from flax_linoss import doctor

        doctor.main()
        return
    try:
        precheck(argv)
    except UserError as e:
        if _show_traceback():
            raise
        _fail(str(e))
    import jax
    from absl import app

    jax.config.config_with_absl()
    sys.argv = argv
    _define_flags()
    app.run(_absl_main, argv=argv)


if __name__ == "__main__":
    main()
