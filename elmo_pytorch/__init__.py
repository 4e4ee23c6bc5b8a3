"""elmo_pytorch: the one name under which this project's modules import each other.

Installed (`pip install .`), the modules are `elmo_pytorch.elmo`, `elmo_pytorch.data`, ... in site-packages,
so that a user's own `data.py` or `tools.py` can never stand in for ours. In a clone they are the flat files
one folder up, which a reader runs as `python train_lm.py`: this file, which only a clone has, makes
`elmo_pytorch.data` mean that folder's `data.py`. The same import lines work both ways.
"""
import os

__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
