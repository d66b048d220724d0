"""First contact and hard edges (issue 12): help, one-line errors, progress and TensorBoard,
the reliability of a workdir (refused runs, NaN stops, crashes before the first checkpoint),
sizes that used to crash, the stable IMEX default, and the older `features=` name."""

import json
import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_after, nan_from, xla_flags
from conftest import tiny_config as _tiny
from flax import nnx

from flax_linoss import linen as fl
from flax_linoss import nnx as fn
from flax_linoss.train import default_config, metrics, trainer
from flax_linoss.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, cwd=None, timeout=240, env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "flax_linoss", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


TINY = "from flax_linoss.train.default_config import get_tiny_config as get_config\n"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(TINY)
    return path


# ----------------------------------------------------------------------------------------
# 1. Help.


def test_help_lists_commands_flags_and_examples_and_exits_zero():
    for args in (["--help"], ["-h"], ["help"]):
        out = _cli(*args)
        assert out.returncode == 0, out.stderr
        for command in ("train", "eval", "plot", "reproduce", "config"):
            assert f"  {command}" in out.stdout
        assert "--config.KEY=VALUE" in out.stdout and "Example" in out.stdout
        assert "flax-linoss config" in out.stdout  # how to see every field
    out = _cli("train", "--help")
    assert out.returncode == 0 and out.stdout.startswith("flax-linoss train:")
    assert "Example: flax-linoss train" in out.stdout
    assert "rst" not in out.stdout and "``" not in out.stdout  # not raw reStructuredText


def test_a_commands_help_lists_only_its_flags_and_ends_with_a_newline():
    from flax_linoss import cli

    def flags(command):
        text = cli.help_text(command)
        assert text.endswith("\n") and not text.endswith("\n\n"), command
        return set(re.findall(r"^  (--\w+)", text, flags=re.M))

    assert flags("train") == {"--config", "--workdir", "--data_dir", "--traceback", "--jax_"}
    assert flags("eval") == flags("train") | {"--which"}
    assert flags("reproduce") == flags("train") | {
        "--seeds",
        "--max_steps",
        "--eval_every",
        "--seed_parallel",
    }
    assert flags("plot") == {"--workdir", "--out", "--traceback"}
    assert flags("config") == {"--config", "--traceback"}
    assert "--which" in cli.help_text() and "--data_dir" in cli.help_text()  # the overview


def test_bad_flags_and_values_are_one_line_in_the_clis_style(tmp_path):
    quick = (f"--workdir={tmp_path / 'w'}", "--config.train.num_steps=1")  # should it train
    _one_line(_cli("train", "--which=latest", *quick), "--which is a flag of eval, not of train")
    _one_line(_cli("train", "--max_steps=5", *quick), "--max_steps is a flag of reproduce")
    _one_line(_cli("train", "--nonsense=1", *quick), "Unknown command line flag 'nonsense'")
    out = _cli("reproduce", f"--workdir={tmp_path}", "--max_steps=abc")
    _one_line(out, "--max_steps=abc", "flax-linoss reproduce --help")
    assert "FATAL" not in out.stderr


def test_data_dir_is_a_flag_of_the_runs_and_data_errors_name_the_cli_flags(tmp_path):
    scp1 = f"--config={REPO}/configs/uea_scp1.py:linoss_im"
    data = tmp_path / "data"
    for command in ("train", "reproduce"):
        out = _cli(
            command,
            scp1,
            f"--workdir={tmp_path / command}",
            f"--data_dir={data}",
            "--config.data.options.download=False",
            "--seeds=1" if command == "reproduce" else "--config.seed=1",
        )
        _one_line(out, f"{data / 'downloads' / 'manual'} does not exist", "--data_dir=DIR")
        assert "--config.data.options.root=DIR" in out.stderr
        assert "root=" not in out.stderr.replace("options.root=", "") and "--manual_dir" not in (
            out.stderr
        )
    _one_line(_cli("eval", f"--workdir={tmp_path / 'none'}", f"--data_dir={data}"), "not exist")


def test_config_command_prints_fields_with_comments():
    out = _cli("config", f"--config={REPO}/configs/uea_scp1.py:d_linoss", "--config.seed=3456")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" = ", 1) for line in out.stdout.splitlines())
    assert lines["seed"].startswith("3456")
    assert lines["model.discretization"].startswith("'damped'  # Discretisation")
    assert "-1 follows `seed`" in lines["data.split_seed"]


# ----------------------------------------------------------------------------------------
# 5. Errors a user causes are one line.


def _one_line(out, *fragments):
    assert out.returncode != 0
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err) == 1, out.stderr
    assert err[0].startswith("flax-linoss: error: ")
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_user_errors_are_one_line(tmp_path, tiny_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    scp1 = f"--config={REPO}/configs/uea_scp1.py:linoss_im"
    _one_line(
        _cli(
            "train",
            scp1,
            f"--workdir={tmp_path / 'w1'}",
            f"--config.data.options.root={empty}",
            "--config.data.options.download=False",
        ),
        "SelfRegulationSCP1",
    )
    _one_line(
        _cli("train", f"--workdir={tmp_path / 'w2'}", "--config.data.name=uea/SelfRegulationSCP2x"),
        "did you mean",
    )
    _one_line(_cli("eval", f"--workdir={tmp_path / 'none'}"), "does not exist")
    _one_line(_cli("eval", f"--workdir={empty}", f"--config={tiny_file}"), "holds no checkpoint")
    _one_line(_cli("plot", str(tmp_path / "none")), "does not exist")
    _one_line(_cli("plot", str(empty)), "metrics.jsonl")
    _one_line(
        _cli("train", f"--config={REPO}/configs/uea_scp1.py:lru", "--config.seed=3"),
        "--config=",
        "Unknown model 'lru'",
    )
    _one_line(
        _cli(
            "train",
            f"--config={tiny_file}",
            f"--workdir={tmp_path / 'w3'}",
            "--config.parallel.num_devices=64",
        ),
        "num_devices=64",
    )
    _one_line(
        _cli(
            "train",
            f"--config={tiny_file}",
            f"--workdir={tmp_path / 'w4'}",
            "--config.parallel.model_axis_size=16",
        ),
        "model_axis_size=16",
    )
    _one_line(_cli("train", scp1, "--config.data.options.rot=x"), "did you mean data.options.root")
    # --traceback shows where it came from.
    out = _cli("eval", f"--workdir={empty}", f"--config={tiny_file}", "--traceback")
    assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr


def test_jax_flags_are_accepted(tmp_path, tiny_file):
    out = _cli(
        "train",
        f"--config={tiny_file}",
        f"--workdir={tmp_path}",
        "--jax_platforms=cpu",
        "--config.train.num_steps=4",
        "--config.train.eval_every=4",
    )
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# 4. Progress and TensorBoard.


def test_progress_shows_seconds_per_step_when_slow(monkeypatch):
    clock = iter([0.0, 30.0, 30.0, 30.5])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    p = metrics.Progress(0, 100)
    assert "3.00 s/step" in p.line(10, {"loss": 1.0})  # 10 steps in 30 s
    p.restart(10)
    assert "40.0 steps/s" in p.line(30, {"loss": 1.0})  # 20 steps in 0.5 s


def test_step_cost_is_said_once_after_the_compiling_step_for_long_runs(monkeypatch):
    clock = iter([10.0, 12.0, 14.0, 16.0])  # steps 1 (compiles), 2, 3, 4 done, 2 s apart
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    cost = metrics.StepCost(0, 100_000)
    lines = [cost.observe(step) for step in (1, 2, 3, 4, 5, 6)]
    assert lines[:3] == [None] * 3 and lines[4:] == [None, None]
    assert lines[3].startswith("a step takes 2.00 s here (cpu, steps 2-4): the 99,996 steps ")
    assert "would take 55h33m" in lines[3] and "wants an accelerator" in lines[3]
    assert "--config.train.num_steps=N" in lines[3] and "--max_steps=N" in lines[3]
    short = metrics.StepCost(0, 200)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 0.0)
    assert all(short.observe(step) is None for step in range(1, 10))


def test_a_long_run_says_early_what_a_step_costs(tmp_path, tamper_train_stream, capsys):
    tamper_train_stream(kill_after(8))
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(_tiny(**{"train.num_steps": 10**7}), str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    cost = next(i for i, line in enumerate(out) if line.startswith("a step takes "))
    assert out[0].startswith("Training") and not any(s.startswith("step") for s in out[:cost])
    assert "wants an accelerator" in out[cost]


def _events(folder):
    """(tag, step, value) of every scalar in a TensorBoard event folder (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out, tags = [], set()
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                tags.add(v.tag)
                if v.HasField("simple_value"):
                    out.append((v.tag, event.step, v.simple_value))
    return out, tags


def test_tensorboard_writes_metrics_learning_rate_and_hparams(tmp_path):
    trainer.train_and_evaluate(_tiny(**{"train.tensorboard": True}), str(tmp_path))
    scalars, tags = _events(tmp_path / "tensorboard")
    names = {t for t, _, _ in scalars}
    assert {"train/loss", "train/learning_rate", "val/accuracy", "test/accuracy"} <= names
    lr = sorted((s, v) for t, s, v in scalars if t == "train/learning_rate")
    assert lr[0][1] > 0 and lr[-1][1] < lr[0][1]  # warmup then cosine decay
    assert "_hparams_/experiment" in tags and any("hparams" in t for t in tags)


# ----------------------------------------------------------------------------------------
# 11-14. A workdir stays consistent.


def test_refused_run_changes_nothing_in_the_workdir(tmp_path):
    workdir = str(tmp_path)
    trainer.train_and_evaluate(_tiny(), workdir)
    before = {
        n: open(os.path.join(workdir, n), "rb").read() for n in ("config.json", "metrics.jsonl")
    }
    from flax_linoss.train.checkpoint import IncompatibleCheckpointError

    with pytest.raises(IncompatibleCheckpointError):
        trainer.train_and_evaluate(_tiny(**{"model.hidden_size": 16}), workdir)
    for name, content in before.items():
        assert open(os.path.join(workdir, name), "rb").read() == content, name
    assert trainer.evaluate(_tiny(), workdir, which="latest")["step"] == 24


def test_eval_of_another_model_size_is_refused_before_restoring(tmp_path, tiny_file):
    workdir = tmp_path / "run"
    assert _cli("train", f"--config={tiny_file}", f"--workdir={workdir}").returncode == 0
    out = _cli(
        "eval", f"--config={tiny_file}", f"--workdir={workdir}", "--config.model.hidden_size=16"
    )
    _one_line(out, "incompatible", "hidden_size: checkpoint 8 vs config 16")
    assert "orbax" not in out.stderr.lower()


def test_a_nan_stop_keeps_only_checkpoints_whose_parameters_gave_a_finite_loss(
    tmp_path, tamper_train_stream
):
    tamper_train_stream(nan_from(13))  # the loss of step 13 comes from the step-12 params
    config = _tiny(
        **{"train.checkpoint_every": 4, "train.eval_every": 4, "train.keep_checkpoints": 5}
    )
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 13\b.*finite loss \(step 8\)"):
        trainer.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit())
    assert steps[-1] == 8
    # Before any checkpoint the message says so (no "step None").
    config = _tiny(**{"train.checkpoint_every": 0, "train.eval_every": 0})
    with pytest.raises(trainer.NonFiniteLossError, match="no checkpoint was saved before it"):
        trainer.train_and_evaluate(config, str(tmp_path / "early"))


def test_a_crash_before_the_first_checkpoint_leaves_no_duplicate_metrics(
    tmp_path, tamper_train_stream
):
    config = _tiny(**{"train.log_every": 4, "train.checkpoint_every": 12, "train.eval_every": 12})
    ref = tmp_path / "ref"
    trainer.train_and_evaluate(config, str(ref))
    tamper_train_stream(kill_after(9))  # after the step-4 and step-8 lines, before 12
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == [4, 8]
    tamper_train_stream.undo()
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    got, want = read_metrics(str(tmp_path / "run")), read_metrics(str(ref))
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]


# ----------------------------------------------------------------------------------------
# 16. Sizes that used to crash; 9. the older `features=` name.


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fn.LinOSSLayer(0, 4, rngs=nnx.Rngs(0)), "in_features must be a positive int"),
        (lambda: fn.LinOSSLayer(4, 0, rngs=nnx.Rngs(0)), "state_size must be a positive int"),
        (lambda: fn.LinOSSLayer(4, -1, rngs=nnx.Rngs(0)), "state_size must be a positive int"),
        (lambda: fn.LinOSSModel(3, 1, 0, 4, 2, rngs=nnx.Rngs(0)), "hidden_size"),
        (lambda: fn.LinOSSModel(3, 1, 8, 0, 2, rngs=nnx.Rngs(0)), "state_size"),
    ],
)
def test_zero_and_negative_sizes_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_linen_zero_sizes_are_clear_errors():
    x = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="state_size must be a positive int"):
        fl.LinOSSLayer(0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="hidden_size"):
        fl.LinOSSModel(1, 0, 4, 2).init(jax.random.key(0), x, deterministic=True)


def test_in_features_is_the_name_and_features_an_alias():
    a = fn.LinOSSLayer(in_features=3, state_size=4, rngs=nnx.Rngs(0))
    b = fn.LinOSSLayer(features=3, state_size=4, rngs=nnx.Rngs(0))
    assert a.in_features == b.in_features == b.features == 3
    np.testing.assert_array_equal(a.b[...], b.b[...])
    with pytest.raises(TypeError, match="not both"):
        fn.LinOSSBlock(in_features=3, features=3, state_size=4, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------
# 17. LinOSS-IMEX is stable by default; the papers' parameterisation stays available.


def test_imex_layer_is_stable_by_default_and_paper_keeps_the_papers_behaviour():
    def layer(constraint):
        mod = fn.LinOSSLayer(2, 4, discretization="imex", constraint=constraint, rngs=nnx.Rngs(0))
        mod.a_raw[...] = jnp.full((4,), 40.0)  # relu(40) * sigmoid(3)^2 ~ 36 > 4
        mod.dt_raw[...] = jnp.full((4,), 3.0)
        return mod

    u = jnp.zeros((1, 400, 2)).at[:, 0].set(1.0)
    stable, paper = layer("stable")(u), layer("paper")(u)
    assert np.isfinite(stable).all() and float(jnp.abs(stable).max()) < 1e3
    assert not np.isfinite(paper).all() or float(jnp.abs(paper).max()) > 1e6
    assert fn.LinOSSLayer(2, 4, rngs=nnx.Rngs(0)).constraint == "stable"
    scp1 = default_config.get_config()
    assert scp1.model.constraint == "stable"
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", os.path.join(REPO, "configs", "uea_scp1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config("linoss_imex").model.constraint == "paper"


# ----------------------------------------------------------------------------------------
# 10. Plots mark the best validation step and draw the learning rate.


def test_plot_marks_the_best_step_and_draws_the_learning_rate(tmp_path):
    from flax_linoss.train import plots

    trainer.train_and_evaluate(_tiny(), str(tmp_path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plots._plot_one(plt, str(tmp_path))
    titles = [ax.get_title() for ax in fig.axes]
    assert "learning_rate" in titles
    best = json.load(open(tmp_path / "results.json"))["best_step"]
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert f"best val (step {best})" in labels
    plt.close(fig)


def test_plot_draws_each_split_in_one_colour_in_every_panel(tmp_path):
    from flax_linoss.train import plots

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "split": "train", "loss": 1.0, "accuracy": 0.5}))
            f.write("\n")
            for split in ("val", "test"):
                rec = {"step": step, "split": split, "loss": 1.0, "accuracy": 0.5}
                f.write(json.dumps({**rec, "decode_accuracy": 0.4}) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plots._plot_one(plt, str(tmp_path))
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in ("train", "val", "test"):
                colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert "decode_accuracy" in [ax.get_title() for ax in fig.axes]
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len(set().union(*colours.values())) == 3
    plt.close(fig)
