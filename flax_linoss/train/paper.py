"""The papers' training protocol as configs (used by the files in ``configs/``).

LinOSS (Rusch & Rus, 2025) and D-LinOSS (Boyer et al., 2025): Adam at a constant learning
rate, no weight decay or clipping, batch 32 (4 for EigenWorms and PPG-DaLiA), evaluation every
1000 steps for up to 100k steps, early stopping after more than 10 evaluations without
validation improvement, test metric at the best validation evaluation; seeds 2345, 3456, 4567,
5678, 6789 (the first is the default; pass another with ``--config.seed``).
"""

from __future__ import annotations

import ml_collections

from flax_linoss.train import default_config

__all__ = ["MODELS", "SEEDS", "paper_config"]

# config-string name -> (discretisation, dropout); D-LinOSS's experiments use dropout 0.1,
# LinOSS's code hard-codes 0.05.
MODELS = {
    "linoss_im": ("im", 0.05),
    "linoss_imex": ("imex", 0.05),
    "dlinoss": ("damped", 0.1),
}
SEEDS = (2345, 3456, 4567, 5678, 6789)


def paper_config(
    dataset: str,
    model: str,
    hparams: dict[str, tuple[float, int, int, int, bool]],
    *,
    batch_size: int = 32,
    options: dict | None = None,
) -> ml_collections.ConfigDict:
    """A paper experiment: the default config with the protocol and one row of hparams.

    Args:
        dataset: ``get_dataset`` name (``"uea/<Name>"`` or ``"ppg_dalia"``).
        model: ``"linoss_im"``, ``"linoss_imex"`` or ``"dlinoss"``.
        hparams: model -> ``(learning rate, hidden H, oscillators P, blocks, time channel)``.
        batch_size: Training batch.
        options: ``get_dataset`` options.
    """
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}")
    lr, hidden, state, blocks, time_channel = hparams[model]
    discretization, dropout = MODELS[model]
    config = default_config.get_config()
    config.seed = SEEDS[0]  # model init, dropout and data order
    config.data.name = dataset  # the experiment's dataset
    config.data.split_seed = SEEDS[0]  # the papers split with the run's seed
    if options is None:
        # UEA: root (raw archive folder) and data_dir (TFDS cache); "" means the default.
        options = {"root": "", "data_dir": ""}
    config.data.options = ml_collections.ConfigDict(options)  # get_dataset options
    config.data.time_channel = time_channel  # prepend t_k = k / L (tuned per experiment)
    config.data.batch_size = batch_size  # the papers' batch
    config.data.eval_batch_size = 64  # any multiple of the device count
    config.model.discretization = discretization  # LinOSS-IM / -IMEX / D-LinOSS
    config.model.num_blocks = blocks  # tuned
    config.model.hidden_size = hidden  # tuned
    config.model.state_size = state  # tuned
    config.model.norm = "batch"  # the papers' block
    config.model.dropout_rate = dropout  # see MODELS
    config.optimizer.name = "adam"  # no weight decay
    config.optimizer.learning_rate = lr  # tuned
    config.optimizer.schedule = "constant"  # the papers use a constant rate
    config.optimizer.warmup_steps = 0  # no warmup
    config.optimizer.grad_clip_norm = 0.0  # no clipping
    config.train.num_steps = 100_000  # upper bound; early stopping ends most runs
    config.train.eval_every = 1000  # the papers' evaluation interval
    config.train.patience = 10  # stop after more than 10 evaluations without improvement
    config.train.checkpoint_every = 1000  # at every evaluation
    config.train.log_every = 100  # progress line
    return config
