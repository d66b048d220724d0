"""Default configuration: a small LinOSS-IM model on the built-in synthetic long-range task.

It trains to a meaningful accuracy in about two minutes on a 2-core CPU. Every experiment config
in ``configs/`` starts from :func:`get_config` and overrides fields; this file names and
documents every field. This module imports only ``ml_collections`` so that absl's
``config_flags`` can load it by path.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default training configuration."""
    config = ml_collections.ConfigDict()
    # Base seed: parameters, dropout and the data order derive from it.
    config.seed = 0
    # Model implementation the trainer runs: "linen" or "nnx" (the same model and results; each
    # checkpoints its own tree, and a run resumes or evaluates with the other API by conversion).
    config.framework = "linen"

    config.data = data = ml_collections.ConfigDict()  # input pipeline
    # Dataset name for flax_linoss.data.get_dataset ("synthetic/long_range", "uea/<Name>", ...).
    data.name = "synthetic/long_range"
    # Seed of the train/val/test split (UEA, PPG) or of the generated data (synthetic);
    # -1 follows `seed`, as in the papers, where one seed drives the split, the
    # initialisation, dropout and the data order (the paper configs use -1).
    data.split_seed = 0
    # Extra keyword options for get_dataset (e.g. length, add_time, root, data_dir).
    data.options = ml_collections.ConfigDict(
        {
            "length": 128,  # steps per sequence
            "cue_length": 8,  # steps of the class code
            "cue_region": 0.25,  # fraction of the sequence where the cue may sit
            "num_train": 2048,  # training examples
            "num_val": 256,  # validation examples
            "num_test": 256,  # test examples
        }
    )
    # Prepend the time channel t_k = k / L as input feature 0 (the papers' option).
    data.time_channel = False
    # Global training batch size (split over processes and devices).
    data.batch_size = 32
    # Global evaluation batch size (the last batch is padded and masked).
    data.eval_batch_size = 128
    # Data shards the train stream is cut into (0: one per process). Fixing it makes the data
    # order independent of the number of processes (each process reads an equal share).
    data.num_shards = 0
    # Grain worker processes per host (0: read in the main process with threads).
    data.worker_count = 0

    config.model = model = ml_collections.ConfigDict()  # the model
    # "paper": the papers' LinOSS classifier / regressor (series tasks); "transformer": a
    # decoder-only language model whose blocks use `model.mixer` (token tasks).
    model.kind = "paper"
    # Discretisation of the "paper" model: "im" (LinOSS-IM), "imex" (LinOSS-IMEX) or
    # "damped" (D-LinOSS).
    model.discretization = "im"
    # Parameterisation of (a, dt): "stable" keeps LinOSS-IMEX's a below 4 / dt^2 (where its
    # oscillators would grow without bound); "paper" is the papers' exact relu / sigmoid (the
    # paper configs use it). LinOSS-IM is stable either way; D-LinOSS is kept strictly stable
    # under both (float32 margins, see flax_linoss.ops.params).
    model.constraint = "stable"
    # Sequence mixer of the "transformer" model: a registered mixer ("attention",
    # "linoss-im", "linoss-imex", "d-linoss", or one you registered) or a comma-separated
    # pattern repeated block by block (hybrids), e.g. "linoss-im,linoss-im,attention".
    model.mixer = "linoss-im"
    # Block of the transformer's LinOSS mixers: "outer" (the default: a multi-head
    # outer-product oscillator memory with a short convolution and a gate, which recalls in
    # context), "plain" (the papers' in_proj -> LinOSS -> out_proj), "selective" (the
    # plain block with input-dependent step sizes) or "outer_selective" (the outer block
    # with input-dependent step sizes); see benchmarks/MIXERS.md.
    model.mixer_block = "outer"
    # Heads of the "transformer" model's attention and outer LinOSS blocks (hidden_size
    # must be a multiple of it for an outer block).
    model.num_heads = 4
    # MLP hidden width of the "transformer" model (0: 4 * hidden_size).
    model.mlp_dim = 0
    # Positional encoding of the "transformer" model: "none", "learned" or "sinusoidal".
    model.positional = "learned"
    # Tie the "transformer" model's output layer to its token embedding.
    model.tie_embeddings = True
    # Number of blocks.
    model.num_blocks = 2
    # Hidden features H (the transformer's width).
    model.hidden_size = 32
    # Oscillators P per LinOSS layer (also of the transformer's LinOSS mixers).
    model.state_size = 32
    # Normalisation in each block: "batch" (Flax's BatchNorm: training normalises with the
    # batch statistics), "batch_running" (the reference code's equinox 0.11 batch norm:
    # training normalises with the running statistics just updated by the batch), "layer"
    # or "rms".
    model.norm = "batch"
    # Dropout after the GELU and after the GLU (transformer: on embeddings and block outputs).
    model.dropout_rate = 0.05
    # Scan implementation: "auto" picks per platform (see flax_linoss.ops).
    model.scan = "auto"
    # Computation dtype of the projections: "float32", "bfloat16" or "float16" (parameters
    # stay float32), or "float64" (with 64-bit JAX: --jax_enable_x64).
    model.dtype = "float32"
    # Parameter (and optimiser state) dtype: "float32", or "float64" for numerical checks
    # (with 64-bit JAX: --jax_enable_x64; set model.dtype too to compute in float64).
    model.param_dtype = "float32"
    # Irregularly sampled data (a dataset with timestamps, e.g. UEA with
    # data.options.drop_fraction): the "paper" model steps each oscillator by its dt times the
    # time since the previous observation. False ignores the timestamps (the steps are taken
    # as equally spaced, and the time channel is k / L).
    model.use_timestamps = True

    config.optimizer = opt = ml_collections.ConfigDict()  # optax optimiser and schedule
    # "adam" or "adamw".
    opt.name = "adam"
    # Peak learning rate.
    opt.learning_rate = 3e-3
    # Schedule after warmup: "constant" or "cosine" (decays to end_lr_factor * peak).
    opt.schedule = "cosine"
    # Linear warmup steps from 0 to the peak (0: no warmup).
    opt.warmup_steps = 100
    # Final learning rate of the cosine schedule, as a fraction of the peak.
    opt.end_lr_factor = 0.01
    # Decoupled weight decay (adamw only).
    opt.weight_decay = 0.0
    # Clip gradients to this global norm (0: no clipping).
    opt.grad_clip_norm = 0.0

    config.train = train = ml_collections.ConfigDict()  # loop, evaluation, checkpoints
    # Training steps (global batches).
    train.num_steps = 1200
    # Steps between progress lines (loss, metric, steps/s, ETA).
    train.log_every = 100
    # Steps between evaluations on val and test (0: only at the end).
    train.eval_every = 200
    # Early stopping: stop after more than this many evaluations without improvement (0: never).
    train.patience = 0
    # Which of several equally good validation evaluations is the best: "first", or "last"
    # (the reference LinOSS code: an equal value replaces the best checkpoint and its test
    # metric, but is no improvement for early stopping).
    train.best_ties = "first"
    # Steps between checkpoints (0: only at the end).
    train.checkpoint_every = 200
    # Recent checkpoints kept (the best one by validation metric is kept apart, in best/).
    train.keep_checkpoints = 2
    # Save checkpoints in a background thread.
    train.async_checkpointing = True
    # Write TensorBoard event files to WORKDIR/tensorboard (tensorboardX, from the `train`
    # extra; no TensorFlow): train/val/test metrics, the learning rate, the hyperparameters.
    train.tensorboard = True

    config.parallel = par = ml_collections.ConfigDict()  # devices, mesh, processes
    # Train step: "jit" (named shardings: every mesh axis; the main implementation),
    # "shard_map" (the step per device with an explicit pmean over the batch axes data and
    # fsdp) or "pmap" (data parallelism only).
    par.implementation = "jit"
    # Devices to use (0: all). Only a prefix of the local devices in one process.
    par.num_devices = 0
    # The mesh is (data, fsdp, seq, model); `data` takes the devices the three sizes below
    # leave. Size of the "fsdp" axis: parameters and optimiser state are sharded over it
    # (fully sharded data parallelism: each device keeps 1/fsdp of them and gathers a layer's
    # weights when it runs) and the batch is split over it, as over `data`.
    par.fsdp_axis_size = 1
    # Size of the "model" (tensor) axis: widths (MLP, heads, vocabulary) and the LinOSS
    # oscillators are split over it; each device runs its own oscillators' recurrence.
    par.model_axis_size = 1
    # Size of the "seq" axis: the length is split over it; the recurrence runs per shard
    # with the closed-form carry between shards (ops' sequence_axis), attention gathers.
    par.sequence_axis_size = 1
    # Logical axis rules: logical name -> mesh axes ("": never split; "a+b": split over both;
    # "a|b": the first of them not already used by another dimension of the same array and
    # dividing it). Parameters name their dimensions with these names (see
    # flax_linoss/train/sharding.py); add entries for the names of a mixer you registered.
    par.logical_axis_rules = ml_collections.ConfigDict(
        {
            "batch": "data+fsdp",  # the batch of the inputs and activations
            "length": "seq",  # the sequence length of the activations
            "embed": "fsdp|model",  # the model width (paper model: the hidden size H)
            "kv": "fsdp|model",  # a mixer's inner width; attention's head dimension
            "mlp": "model",  # the MLP's (paper model: the GLU's) hidden width
            "heads": "model",  # attention heads
            "vocab": "model",  # the vocabulary (embedding table, output layer)
            "oscillator": "model",  # the P oscillators of every LinOSS layer
        }
    )
    # Call jax.distributed.initialize (multi-host; also set the three fields below if the
    # platform cannot detect them).
    par.distributed = False
    # Coordinator "host:port" for jax.distributed.initialize ("" : auto-detect).
    par.coordinator_address = ""
    # Number of processes (0: auto-detect).
    par.num_processes = 0
    # This process's index (-1: auto-detect).
    par.process_id = -1
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    """A seconds-long variant of :func:`get_config` for smoke tests and CI."""
    config = get_config()
    config.data.options.length = 32
    config.data.options.num_train = 128
    config.data.options.num_val = 64
    config.data.options.num_test = 64
    config.data.batch_size = 16
    config.data.eval_batch_size = 32
    config.model.num_blocks = 1
    config.model.hidden_size = 8
    config.model.state_size = 8
    config.optimizer.warmup_steps = 2
    config.train.num_steps = 24
    config.train.log_every = 8
    config.train.eval_every = 12
    config.train.checkpoint_every = 12
    config.train.tensorboard = False
    return config
