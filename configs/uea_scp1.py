"""SelfRegulationSCP1 (UEA): the papers' experiment for LinOSS-IM, LinOSS-IMEX and D-LinOSS.

Pick the model with the config string (default linoss_im)::

    flax-linoss train --config=configs/uea_scp1.py:linoss_im --workdir=runs/scp1-im
    flax-linoss train --config=configs/uea_scp1.py:linoss_imex --workdir=runs/scp1-imex
    flax-linoss train --config=configs/uea_scp1.py:d_linoss --workdir=runs/scp1-dlinoss

Irregular sampling (the Neural-CDE protocol: 30%, 50% or 70% of every series' steps dropped at
random; the model gets the kept steps' timestamps): append ``-drop30``, ``-drop50`` or
``-drop70`` to the model, or set the option on any of them::

    flax-linoss train --config=configs/uea_scp1.py:linoss_im-drop50 --workdir=runs/scp1-im-d50
    flax-linoss train --config=configs/uea_scp1.py:linoss_im --config.data.options.drop_fraction=0.5

``--config.model.use_timestamps=False`` trains the same model ignoring the timestamps.

The protocol (Adam, constant rate, eval every 1000 steps, patience 10, seed 2345) is in
flax_linoss.train.paper.paper_config. The raw files are read from
``<data dir>/downloads/manual/uea/SelfRegulationSCP1`` (the data directory is
``$FLAX_LINOSS_DATA_DIR``, else ``~/tensorflow_datasets``; ``--config.data.options.root=DIR``
reads them elsewhere, else they are downloaded) and prepared once into the data directory.
"""

from flax_linoss.train.paper import paper_config

# model -> (learning rate, hidden H, oscillators P, blocks, time channel): the papers' best.
HPARAMS = {
    "linoss_im": (1e-4, 128, 256, 6, True),
    "linoss_imex": (1e-4, 64, 256, 6, False),
    "d_linoss": (1e-4, 128, 256, 6, True),
}


# config-string suffix -> share of every series' steps dropped
DROPPED = {"drop30": 0.3, "drop50": 0.5, "drop70": 0.7}


def get_config(model: str = "linoss_im"):
    """The experiment for ``model`` in linoss_im, linoss_imex, d_linoss (alias dlinoss),
    optionally with a suffix ``-drop30``, ``-drop50`` or ``-drop70`` (irregular sampling)."""
    model, _, dropped = model.partition("-")
    if dropped and dropped not in DROPPED:
        raise ValueError(f"unknown suffix {dropped!r}; use one of {', '.join(DROPPED)}")
    config = paper_config("uea/SelfRegulationSCP1", model, HPARAMS, batch_size=32)
    config.data.options.drop_fraction = DROPPED.get(dropped, 0.0)
    return config
