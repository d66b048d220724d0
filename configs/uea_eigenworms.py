"""EigenWorms (UEA): the papers' experiment for LinOSS-IM, LinOSS-IMEX and D-LinOSS.

Pick the model with the config string (default linoss_im)::

    flax-linoss train --config=configs/uea_eigenworms.py:linoss_im --workdir=runs/eigenworms-im
    flax-linoss train --config=configs/uea_eigenworms.py:linoss_imex --workdir=runs/eigenworms-imex
    flax-linoss train --config=configs/uea_eigenworms.py:d_linoss --workdir=runs/eigenworms-dlinoss

The protocol (Adam, constant rate, eval every 1000 steps, patience 10, seed 2345) is in
flax_linoss.train.paper.paper_config. The raw files are read from
``<data dir>/downloads/manual/uea/EigenWorms`` (the data directory is
``$FLAX_LINOSS_DATA_DIR``, else ``~/tensorflow_datasets``; ``--config.data.options.root=DIR``
reads them elsewhere, else they are downloaded) and prepared once into the data directory.
"""

from flax_linoss.train.paper import paper_config

# model -> (learning rate, hidden H, oscillators P, blocks, time channel): the papers' best.
HPARAMS = {
    "linoss_im": (1e-3, 128, 64, 2, True),
    "linoss_imex": (1e-4, 64, 16, 2, False),
    "d_linoss": (1e-3, 128, 64, 2, False),
}


def get_config(model: str = "linoss_im"):
    """The experiment for ``model`` in linoss_im, linoss_imex, d_linoss (alias dlinoss)."""
    return paper_config("uea/EigenWorms", model, HPARAMS, batch_size=4)
