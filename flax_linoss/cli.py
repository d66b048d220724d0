"""``flax-linoss`` command line (also ``python -m flax_linoss``), in the Flax-examples way.

Usage::

    flax-linoss train [--config=configs/uea_scp1.py:linoss_im] [--config.key=value ...]
                      [--workdir=DIR]
    flax-linoss eval  --workdir=DIR [--config=...] [--which=best|latest]
    flax-linoss plot  WORKDIR [--out=curves.png]

With no ``--config``, ``train`` uses :mod:`flax_linoss.train.default_config` (a small LinOSS
on the built-in synthetic long-range task, a couple of minutes on a laptop CPU). ``eval``
without ``--config`` reads the run's saved ``config.json`` (``--config.key=value`` overrides
still apply, e.g. ``--config.parallel.num_devices=1``). Restarting ``train`` with the same
``--workdir`` resumes from its last checkpoint. An unknown ``--config.key`` is an error that
lists the closest known keys.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from flax_linoss.train import default_config

COMMANDS = ("train", "eval", "plot", "reproduce")
DEFAULT_CONFIG = default_config.__file__

FLAGS = flags.FLAGS
_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
    # Defined on first use, after precheck_overrides: config_flags parses the default config
    # (and its overrides) as soon as the flag is defined.
    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config",
        DEFAULT_CONFIG,
        "ml_collections config file (optionally FILE:ARG); default: the synthetic default.",
        lock_config=True,
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Run directory: checkpoints, metrics.jsonl, curves (default: runs/<time>)."
    )
    _FLAGS["which"] = flags.DEFINE_enum(
        "which", "best", ["best", "latest"], "eval: which checkpoint."
    )
    _FLAGS["out"] = flags.DEFINE_string("out", None, "plot: PNG path (default WORKDIR/curves.png).")
    _FLAGS["seeds"] = flags.DEFINE_list(
        "seeds", None, "reproduce: comma-separated seeds (default: the papers' five)."
    )
    _FLAGS["max_steps"] = flags.DEFINE_integer(
        "max_steps", None, "reproduce: budget, at most this many steps per seed."
    )
    _FLAGS["eval_every"] = flags.DEFINE_integer(
        "eval_every", None, "reproduce: budget, evaluate and checkpoint every this many steps."
    )
    _FLAGS["seed_parallel"] = flags.DEFINE_bool(
        "seed_parallel", False, "reproduce: train all seeds as one compiled program."
    )


def _load_config_file(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise SystemExit(f"flax-linoss: config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_flax_linoss_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _override_keys(argv: list[str]) -> list[str]:
    keys = []
    for a in argv:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
        if m:
            keys.append(m.group(1))
    return keys


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def precheck_overrides(argv: list[str]) -> None:
    """Exits with a message listing close matches when a ``--config.KEY`` is unknown.

    Runs before absl parses the flags, whose own error would not suggest anything.
    """
    from flax_linoss.train.config import ConfigError, check_override_keys

    keys = _override_keys(argv)
    if not keys:
        return
    spec = _config_spec(argv)
    if spec is None and len(argv) > 1 and argv[1] == "eval":
        workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
        if workdir and os.path.exists(os.path.join(workdir, "config.json")):
            spec = None  # checked against the default, which has the same keys
    config = _load_config_file(spec) if spec else default_config.get_config()
    try:
        check_override_keys(config, keys)
    except ConfigError as e:
        raise SystemExit(f"flax-linoss: {e}") from None


def _saved_config(workdir: str, argv: list[str]):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        config = ml_collections.ConfigDict(__import__("json").load(f))
    for key in _override_keys(argv):  # apply the typed overrides parsed into FLAGS.config
        node_new, node_old = FLAGS.config, config
        *parents, leaf = key.split(".")
        for p in parents:
            node_new, node_old = node_new[p], node_old[p]
        node_old[leaf] = node_new[leaf]
    return config


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(
            f"usage: flax-linoss {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]!r}"
        )
    command, rest = argv[1], argv[2:]
    if not any(a.startswith(("--verbosity", "-v=")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if command == "plot":
        from flax_linoss.train.plots import plot_run

        workdir = rest[0] if rest else _FLAGS["workdir"].value
        if not workdir:
            raise app.UsageError("usage: flax-linoss plot WORKDIR [--out=PNG]")
        print(plot_run(workdir, _FLAGS["out"].value))
        return
    if rest:
        raise app.UsageError(f"unexpected arguments {rest!r}")
    from flax_linoss.train import trainer
    from flax_linoss.train.checkpoint import IncompatibleCheckpointError
    from flax_linoss.train.config import ConfigError

    try:
        if command == "train":
            workdir = _FLAGS["workdir"].value or os.path.join(
                "runs", time.strftime("%Y%m%d-%H%M%S")
            )
            trainer.train_and_evaluate(_FLAGS["config"].value, workdir)
        elif command == "reproduce":
            from flax_linoss.data.protocol import PAPER_SEEDS
            from flax_linoss.train.reproduce import reproduce

            workdir = _FLAGS["workdir"].value
            if not workdir:
                raise app.UsageError("flax-linoss reproduce needs --workdir")
            try:
                seeds = [int(x) for x in (_FLAGS["seeds"].value or PAPER_SEEDS)]
            except ValueError:
                raise app.UsageError(
                    f"--seeds must be integers, got {_FLAGS['seeds'].value}"
                ) from None
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
        else:
            workdir = _FLAGS["workdir"].value
            if not workdir:
                raise app.UsageError("flax-linoss eval needs --workdir")
            saved = os.path.join(workdir, "config.json")
            if _config_spec(sys.argv) is None and os.path.exists(saved):
                config = _saved_config(workdir, sys.argv)
            else:
                config = _FLAGS["config"].value
            trainer.evaluate(config, workdir, which=_FLAGS["which"].value)
    except (ConfigError, IncompatibleCheckpointError, trainer.NonFiniteLossError) as e:
        raise SystemExit(f"flax-linoss: {e}") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "flax-linoss"
    precheck_overrides(argv)
    sys.argv = argv
    _define_flags()
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
