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
        "flax-linoss train [--config=FILE[:ARG]] [--config.KEY=VALUE ...] [--workdir=DIR] "
        "[--data_dir=DIR]",
        "flax-linoss train --config=configs/uea_scp1.py:linoss_im --workdir=runs/scp1",
    ),
    "eval": (
        "evaluate a run's best (or latest) checkpoint on val and test",
        "flax-linoss eval --workdir=DIR [--which=best|latest] [--config=...] "
        "[--config.KEY=VALUE ...] [--data_dir=DIR]",
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
        "[--max_steps=N] [--eval_every=N] [--seed_parallel] [--data_dir=DIR]",
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

_RUNS = ("train", "eval", "reproduce")
_CONFIGURED = (*_RUNS, "config")

# flag (as written in help) -> (description lines, the commands that take it)
FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "--config=FILE[:ARG]": (
        (
            "an ml_collections config file (default: the built-in synthetic",
            "default); ARG picks a variant, e.g. configs/uea_scp1.py:linoss_im",
        ),
        _CONFIGURED,
    ),
    "--config.KEY=VALUE": (
        (
            "override one field, e.g. --config.train.num_steps=500",
            "(see every field: flax-linoss config [--config=...])",
        ),
        _CONFIGURED,
    ),
    "--workdir=DIR": (
        ("run folder: checkpoints, metrics.jsonl, tensorboard/, config.json",),
        (*_RUNS, "plot"),
    ),
    "--data_dir=DIR": (
        (
            "data directory: prepared datasets, and raw files found in",
            "DIR/downloads/manual/ (default $FLAX_LINOSS_DATA_DIR, else",
            "~/tensorflow_datasets); raw files elsewhere: --config.data.options.root",
        ),
        _RUNS,
    ),
    "--which=best|latest": (("which checkpoint (default best)",), ("eval",)),
    "--out=PNG": (("output path (default WORKDIR/curves.png)",), ("plot",)),
    "--seeds=S1,S2,...": (
        ("seeds (default the papers' 2345,3456,4567,5678,6789)",),
        ("reproduce",),
    ),
    "--max_steps=N": (("budget: at most N steps per seed",), ("reproduce",)),
    "--eval_every=N": (("budget: evaluate (and checkpoint) every N steps",), ("reproduce",)),
    "--seed_parallel": (("train all seeds as one compiled program",), ("reproduce",)),
    "--traceback": (
        ("on an error, show the Python traceback (also --verbosity=1)",),
        tuple(COMMANDS),
    ),
    "--jax_*": (("JAX's own flags, e.g. --jax_platforms=cpu",), _RUNS),
}

SEED_NOTE = """\
In the papers' configs one seed (--config.seed) drives the split, the initialisation,
dropout and the data order; --config.data.split_seed=S fixes the split separately."""


def _flag_name(flag: str) -> str:
    return re.split(r"[=\[]", flag.lstrip("-"), maxsplit=1)[0]


def flags_help(command: str | None = None) -> str:
    """The ``Flags:`` section: every flag, or those ``command`` takes (with the command's
    name for each flag that only some commands take, in the overview)."""
    lines = ["Flags:"]
    for flag, (text, commands) in FLAGS.items():
        if command is not None and command not in commands:
            continue
        if command is None and len(commands) == 1:
            text = (f"{commands[0]}: {text[0]}", *text[1:])
        lines.append(f"  {flag:<22}  {text[0]}")
        lines += [f"  {'':<22}  {t}" for t in text[1:]]
    if command in (None, "train", "reproduce", "config"):
        lines += ["", SEED_NOTE]
    return "\n".join(lines)


def help_text(command: str | None = None) -> str:
    """The help for ``command`` (or for the whole tool), ending with a newline."""
    if command in COMMANDS:
        summary, usage, example = COMMANDS[command]
        return (
            f"flax-linoss {command}: {summary}\n\nUsage: {usage}\nExample: {example}\n\n"
            + flags_help(command)
            + "\n"
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
        flags_help(),
    ]
    return "\n".join(lines) + "\n"


def check_flags_of(command: str, argv: list[str]) -> None:
    """Raises :class:`UserError` for a flag of another command (``train --which=latest``)."""
    owners = {_flag_name(f): commands for f, (_, commands) in FLAGS.items()}
    for a in argv[1:]:
        m = re.match(r"^--?(?:no)?(\w+)(?:=|$)", a)
        if not m or m.group(1) not in owners:
            continue
        commands = owners[m.group(1)]
        if command not in commands:
            raise UserError(
                f"--{m.group(1)} is a flag of {' / '.join(commands)}, not of {command} "
                f"(flax-linoss {command} --help lists its flags)"
            )


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
    """A run's ``config.json`` with the command line's typed overrides applied (fields
    added to the config since the run was made take their defaults)."""
    import ml_collections

    from flax_linoss.train.config import flat_keys

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))

    def copy(key, source):  # config[key] = source[key], for a dotted key
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node, source = node[p], source[p]
        node[leaf] = source[leaf]

    have, default = flat_keys(config), default_config.get_config()
    for key in flat_keys(default):
        if key not in have:
            copy(key, default)
    for key in _override_keys(argv):
        copy(key, parsed)
    return config


def _fit_mesh(config, overridden: list[str]) -> None:
    """Evaluating a run on fewer devices than it trained on: the training mesh (its device
    count, fsdp / model / seq sizes) is dropped for all devices here, data-parallel, when it
    does not fit and the command line did not set it (checkpoints restore into any mesh)."""
    import jax

    p = config.parallel
    keys = ["num_devices"] + [f"{axis}_axis_size" for axis in ("fsdp", "model", "sequence")]
    if any(f"parallel.{k}" in overridden for k in keys):
        return
    here = jax.device_count()
    devices = p.num_devices or here
    if devices > here or devices % (p.fsdp_axis_size * p.model_axis_size * p.sequence_axis_size):
        print(
            f"The run's mesh ({', '.join(f'{k}={p[k]}' for k in keys)}) does not fit the "
            f"{here} device(s) here; evaluating data-parallel on all of them.",
            flush=True,
        )
        p.num_devices = 0
        for k in keys[1:]:
            p[k] = 1


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
_RUN: dict = {}  # the run folder of the command being run ("workdir"), for messages


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "ml_collections config file (FILE[:ARG]).", lock_config=True
    )
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run directory.")
    _FLAGS["data_dir"] = flags.DEFINE_string("data_dir", None, "Data directory.")
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


def _use_data_dir(config) -> None:
    """``--data_dir=DIR``: the data directory of this process (``$FLAX_LINOSS_DATA_DIR``) and
    of the config's dataset options where they name one."""
    from flax_linoss.data import paths

    value = _FLAGS["data_dir"].value
    if not value:
        return
    value = os.path.abspath(os.path.expanduser(value))
    os.environ[paths.ENV_VAR] = value
    options = config.data.options
    if "data_dir" in options:
        options["data_dir"] = value


def _run_command(command: str, rest: list[str]) -> None:
    from flax_linoss.train import trainer

    if command == "config":
        print(config_text(_FLAGS["config"].value), end="")
    elif command == "plot":
        from flax_linoss.train.plots import plot_run

        workdir = rest[0] if rest else _workdir("plot")
        print(plot_run(workdir, _FLAGS["out"].value))
    elif command == "train":
        workdir = _workdir("train", required=False)
        if not workdir:
            workdir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            given = (
                "--workdir is empty" if _flag_value(sys.argv, "workdir") == "" else "no --workdir"
            )
            print(f"{given}: this run goes to {os.path.abspath(workdir)}", flush=True)
        _use_data_dir(_FLAGS["config"].value)
        _RUN["workdir"] = workdir
        trainer.train_and_evaluate(_FLAGS["config"].value, workdir)
    elif command == "eval":
        workdir = _workdir("eval")
        if not os.path.isdir(workdir):
            raise UserError(f"--workdir={workdir} does not exist")
        saved = os.path.join(workdir, "config.json")
        if _flag_value(sys.argv, "config") is None and os.path.exists(saved):
            config = _saved_config(workdir, sys.argv, _FLAGS["config"].value)
            _fit_mesh(config, _override_keys(sys.argv))
        else:
            config = _FLAGS["config"].value
        _use_data_dir(config)
        trainer.evaluate(config, workdir, which=_FLAGS["which"].value)
    else:
        _reproduce()


def _reproduce() -> None:
    from flax_linoss.data.protocol import PAPER_SEEDS
    from flax_linoss.train.reproduce import reproduce

    workdir = _workdir("reproduce")
    _use_data_dir(_FLAGS["config"].value)
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
    from flax_linoss.train.checkpoint import DamagedCheckpointError, IncompatibleCheckpointError
    from flax_linoss.train.config import ConfigError
    from flax_linoss.train.trainer import NonFiniteLossError
    from flax_linoss.train.workdir import WorkdirError

    return (
        UserError,
        ConfigError,
        DataError,
        IncompatibleCheckpointError,
        DamagedCheckpointError,
        NonFiniteLossError,
        WorkdirError,
        FileNotFoundError,
    )


def _absl_main(argv: list[str]) -> None:
    from absl import logging

    command, rest = argv[1], argv[2:]
    if command != "plot" and rest:
        raise UserError(f"unexpected arguments {rest!r} (flags are written --name=value)")
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from flax_linoss.train import workdir as workdir_lib
    from flax_linoss.train.checkpoint import DamagedCheckpointError

    # The error paths run inside the quiet context too, and the process keeps dropping the
    # callbacks a failed read leaves behind until it exits (after a damaged checkpoint was
    # skipped, they may fire at the interpreter's exit): no traceback after the one line.
    sys.unraisablehook = workdir_lib.drop_closed_loop_callbacks(sys.unraisablehook)
    with workdir_lib.quiet_background_errors():
        try:
            _run_command(command, rest)
        except KeyboardInterrupt as e:  # Ctrl-C: where it stopped, and how to go on
            if _show_traceback():
                raise
            if not isinstance(e, workdir_lib.Interrupted):
                resume = workdir_lib.latest_checkpoint_step(_RUN.get("workdir"))
                e = "interrupted" + (
                    f"; rerun the same command to resume from step {resume}"
                    if resume is not None
                    else ""
                )
            _exit(f"flax-linoss: {e}", 130)
        except _user_errors() as e:
            if _show_traceback():
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, DamagedCheckpointError):  # Orbax's threads hold the failed reads
                _exit(f"flax-linoss: error: {message}", 1)
            _fail(message)
        except Exception as e:  # a full disk, a read-only folder: one line, not Orbax's pages
            message = workdir_lib.describe_failure(e, _RUN.get("workdir"))
            if message is None or _show_traceback():
                raise
            _exit(f"flax-linoss: error: {message}", 1)


def _exit(message: str, status: int) -> None:
    """Prints ``message`` and ends the process at once: background threads (Orbax's saves)
    may still hold the failure that stopped the run and would print it again at exit."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


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
        check_flags_of(command, argv)
        precheck(argv)
    except UserError as e:
        if _show_traceback():
            raise
        _fail(str(e))
    import jax
    from absl import app

    from flax_linoss.data.errors import spell_options

    spell_options(
        root="--config.data.options.root=DIR",
        manual_dir="--config.data.options.manual_dir=DIR",
        data_dir="--data_dir=DIR",
    )
    jax.config.config_with_absl()
    sys.argv = argv
    _define_flags()
    app.run(_absl_main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or value as one line in this tool's style."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if _show_traceback():
            raise
        command = argv[1] if len(argv) > 1 else ""
        _fail(f"{e} (flax-linoss {command} --help lists the flags)".replace("  ", " "))


if __name__ == "__main__":
    main()
