"""Config files and config checks."""

import ast
import importlib.util
import pathlib

import pytest

from flax_linoss.train import config as config_lib
from flax_linoss.train import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_paper_experiment_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert names == {
        "default",
        "ppg_dalia",
        "uea_eigenworms",
        "uea_scp1",
        "uea_scp2",
        "uea_ethanol",
        "uea_heartbeat",
        "uea_motor",
        "mixers",
        "irregular_oscillator",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_validate_for_every_model(path):
    module = _load(path)
    if path.stem in ("default", "irregular_oscillator"):
        config_lib.validate(module.get_config())
        return
    if path.stem == "mixers":
        for task in module.TASKS:
            config = config_lib.validate(module.get_config(task))
            assert config.model.kind == "transformer" and config.data.name.endswith(task)
        with pytest.raises(ValueError, match="Unknown task"):
            module.get_config("lra")
        return
    for model, (disc, key) in {
        "linoss_im": ("im", "linoss_im"),
        "linoss_imex": ("imex", "linoss_imex"),
        "d_linoss": ("damped", "d_linoss"),
        "dlinoss": ("damped", "d_linoss"),  # the older spelling stays an alias
    }.items():
        config = config_lib.validate(module.get_config(model))
        lr, hidden, state, blocks, time = module.HPARAMS[key]
        assert config.model.discretization == disc
        assert (config.optimizer.learning_rate, config.model.hidden_size) == (lr, hidden)
        assert (config.model.state_size, config.model.num_blocks) == (state, blocks)
        assert config.data.time_channel == time and config.train.patience == 10


def test_scp1_row_matches_the_papers():
    scp1 = _load(REPO / "configs" / "uea_scp1.py").get_config("linoss_im")
    assert scp1.optimizer.learning_rate == 1e-4 and scp1.model.state_size == 256
    assert scp1.model.num_blocks == 6 and scp1.data.time_channel and scp1.seed == 2345
    assert scp1.data.options.drop_fraction == 0.0 and scp1.model.use_timestamps


def test_scp1_irregular_sampling_configs():
    module = _load(REPO / "configs" / "uea_scp1.py")
    for suffix, fraction in (("drop30", 0.3), ("drop50", 0.5), ("drop70", 0.7)):
        config = config_lib.validate(module.get_config(f"d_linoss-{suffix}"))
        assert config.data.options.drop_fraction == fraction
        assert config.model.discretization == "damped"
    with pytest.raises(ValueError, match="unknown suffix 'drop40'"):
        module.get_config("linoss_im-drop40")


def test_every_default_field_has_a_comment():
    src = (REPO / "flax_linoss" / "train" / "default_config.py").read_text()
    lines = src.splitlines()
    func = next(
        n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "get_config"
    )
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            line = node.lineno - 1
            has = "#" in lines[line] or lines[line - 1].strip().startswith("#")
            assert has, f"no comment for line {line + 1}: {lines[line]!r}"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("train.num_steps", "10", "must be a int"),
        ("parallel.implementation", "pmapp", "did you mean pmap"),
        ("optimizer.weight_decay", 0.1, "adamw"),
        ("model.dropout_rate", 1.5, "dropout_rate"),
        ("data.batch_size", 0, "data.batch_size"),
    ],
)
def test_bad_values(key, value, match):
    config = default_config.get_config()
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config)


def test_unknown_keys_list_close_matches():
    config = default_config.get_config()
    with pytest.raises(config_lib.ConfigError, match=r"did you mean model\.hidden_size"):
        config_lib.check_override_keys(config, ["model.hiden_size"])
    config.train.unlock()
    config.train.num_stpes = 3
    with pytest.raises(config_lib.ConfigError, match=r"did you mean train\.num_steps"):
        config_lib.validate(config)
    config_lib.check_override_keys(default_config.get_config(), ["data.options.length"])


def test_float16_attention_on_a_cpu_is_one_clear_error_before_any_data():
    from flax_linoss.train import trainer

    config = _load(REPO / "configs" / "mixers.py").get_config("mqar")
    config.model.dtype = "float16"
    config.data.name = "not/loaded"  # the check comes before the data
    config.model.mixer = "linoss-im,attention"
    with pytest.raises(config_lib.ConfigError, match="'float16' with attention needs a GPU"):
        trainer.setup(config)
    config.model.mixer = "linoss-im"  # LinOSS alone runs float16 here: on to the data
    with pytest.raises(Exception, match="not/loaded") as e:
        trainer.setup(config)
    assert "float16" not in str(e.value)
