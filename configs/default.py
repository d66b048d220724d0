"""The default run: a small LinOSS-IM on the synthetic long-range task (~2 min on a CPU).

The fields and their comments live in ``flax_linoss/train/default_config.py`` (installed with
the package, so ``flax-linoss train`` works without this repository). Usage::

    flax-linoss train --config=configs/default.py --workdir=runs/default
"""

from flax_linoss.train.default_config import get_config

__all__ = ["get_config"]
