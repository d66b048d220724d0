"""Sequence-mixer comparison tasks: a small transformer LM with any registered mixer.

Pick the task with the config string and the mixer with one override::

    flax-linoss train --config=configs/mixers.py:mqar --config.model.mixer=d-linoss
    flax-linoss train --config=configs/mixers.py:selective_copy --config.model.mixer=attention
    flax-linoss train --config=configs/mixers.py:induction \\
        --config.model.mixer=linoss-im,linoss-im,attention         # a hybrid, block by block

Tasks (built in, no download, deterministic by seed; see flax_linoss.data.lm_tasks):

* ``mqar``: multi-query associative recall (Zoology, Arora et al. 2023): key-value pairs,
  then the keys again as queries; accuracy on the query positions.
* ``selective_copy``: selective copying (Mamba, Gu & Dao 2023): data tokens scattered among
  noise, copied in order after the markers; accuracy on the copy positions.
* ``induction``: induction heads: the token after a trigger, recalled at the trigger's second
  occurrence; accuracy on that position.

Sizes are chosen to train in minutes on a CPU (``benchmarks/bench_mixers.py`` runs them all);
the papers' settings are larger (Zoology: vocabulary 8192, widths 64-512; Mamba's selective
copying: length 4096). ``--config.data.options.seq_len=N`` changes the length.
"""

from flax_linoss.train.default_config import get_config as default

TASKS = {
    # task -> (dataset, options (the task's own fields), training steps)
    "mqar": (
        "synthetic/mqar",
        {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 8, "power_a": 0.01},
        1500,
    ),
    "selective_copy": (
        "synthetic/selective_copy",
        {"vocab_size": 17, "seq_len": 64, "num_tokens_to_copy": 8},
        1500,
    ),
    "induction": ("synthetic/induction", {"vocab_size": 17, "seq_len": 64}, 1500),
}


def get_config(task: str = "mqar"):
    """The mixer-comparison experiment for ``task`` in mqar, selective_copy, induction."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}")
    dataset, options, steps = TASKS[task]
    config = default()
    config.seed = 0  # init, dropout, data order and the generated data (split_seed -1)
    config.data.name = dataset  # a built-in token task
    config.data.split_seed = -1  # -1: generate the data with `seed`
    # The task's options, plus how many examples each split has.
    config.data.options = {**options, "num_train": 20_000, "num_val": 512, "num_test": 512}
    config.data.batch_size = 32  # sequences per step
    config.data.eval_batch_size = 128  # any multiple of the device count
    config.model.kind = "transformer"  # token embedding, pre-norm blocks, tied output
    config.model.mixer = "linoss-im"  # override: attention, linoss-imex, d-linoss, patterns
    config.model.num_blocks = 2  # blocks
    config.model.hidden_size = 64  # width (equal for every mixer)
    config.model.state_size = 64  # oscillators of each LinOSS mixer
    config.model.num_heads = 4  # heads of attention and of the outer LinOSS block
    config.model.mixer_block = "outer"  # LinOSS mixers' block; "plain": the papers' block
    config.model.mlp_dim = 0  # 4 * width
    config.model.positional = "learned"  # attention needs them; every mixer gets the same input
    config.model.dropout_rate = 0.0  # synthetic tasks: no dropout
    config.optimizer.name = "adamw"  # AdamW, warmup and cosine decay
    config.optimizer.learning_rate = 3e-3  # peak
    config.optimizer.weight_decay = 0.1  # as in Zoology
    config.optimizer.schedule = "cosine"  # to 1% of the peak
    config.optimizer.warmup_steps = 100  # linear warmup
    config.train.num_steps = steps  # the budget
    config.train.log_every = 100  # progress line
    config.train.eval_every = 500  # val and test accuracy (and decoding through the caches)
    config.train.checkpoint_every = 500  # resumable
    config.train.patience = 0  # no early stopping
    return config
