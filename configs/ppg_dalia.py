"""PPG-DaLiA heart-rate regression: the papers' experiment for LinOSS-IM, -IMEX and D-LinOSS.

Pick the model with the config string (default linoss_im)::

    flax-linoss train --config=configs/ppg_dalia.py:d_linoss --workdir=runs/ppg-dlinoss \
        --config.data.options.manual_dir=/path/to/PPG_FieldStudy/..

The data must be prepared once (``manual_dir``: the folder holding ``PPG_FieldStudy/``; or a
prepared TFDS ``data_dir``). Windows of 49,920 steps with 390 targets each (one per 128 steps);
batch 4; the metric is test MSE at the best validation evaluation.
"""

from flax_linoss.train.paper import paper_config

# model -> (learning rate, hidden H, oscillators P, blocks, time channel): the papers' best.
HPARAMS = {
    "linoss_im": (1e-3, 16, 64, 6, True),
    "linoss_imex": (1e-4, 64, 16, 2, True),
    "d_linoss": (1e-3, 64, 64, 4, True),
}


def get_config(model: str = "linoss_im"):
    """The experiment for ``model`` in linoss_im, linoss_imex, d_linoss (alias dlinoss)."""
    return paper_config(
        "ppg_dalia",
        model,
        HPARAMS,
        batch_size=4,
        # get_dataset options: manual_dir (raw PPG_FieldStudy parent) and data_dir (TFDS cache);
        # "" means the default location.
        options={"manual_dir": "", "data_dir": ""},
    )
