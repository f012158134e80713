"""`python -m vyre_sqlcache`: the command line."""

import sys

from .cli import console

sys.exit(console())
