"""Command line for the training data: ``python -m distseq.data prepare --input FILES --out DIR``.

The data code itself lives in :mod:`distseq.train.data`; this package is only its CLI.
"""

from distseq.train.data.prepare import prepare

__all__ = ["prepare"]
