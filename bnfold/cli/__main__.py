"""``python -m bnfold.cli``, as the ``bnfold`` script."""

import sys

from bnfold.cli import main

sys.exit(main())
