"""`python -m torture`: the trials, and the table of figures."""

import sys

from .command import main

sys.exit(main())
