"""The synthetic irregularly sampled task: an oscillation's frequency band from random-time samples.

Each series is 64 samples of a damped oscillation at random times in a window of random length
(``flax_linoss.data.synthetic.irregular_oscillator_example``): without the times the bands
overlap, with them they do not. A small LinOSS-IM trains on it in a few minutes on a CPU::

    flax-linoss train --config=configs/irregular_oscillator.py --workdir=runs/irregular
    flax-linoss train --config=configs/irregular_oscillator.py --workdir=runs/irregular-no-t \
        --config.model.use_timestamps=False        # the same model, ignoring the timestamps
"""

import ml_collections

from flax_linoss.train.default_config import get_config as default_config


def get_config():
    """The default small LinOSS-IM on ``synthetic/irregular_oscillator``."""
    config = default_config()
    config.data.name = "synthetic/irregular_oscillator"
    # get_dataset options (see irregular_oscillator_example for the task's own).
    config.data.options = ml_collections.ConfigDict(
        {
            "length": 64,  # samples per series
            "num_train": 4096,  # training examples
            "num_val": 512,  # validation examples
            "num_test": 512,  # test examples
        }
    )
    config.train.num_steps = 1000  # steps
    config.train.eval_every = 250  # evaluation interval
    config.train.checkpoint_every = 250  # checkpoint interval
    return config
