"""`python -m fabric.cli` runs the `fabric` command."""

import sys

from fabric.cli import main

sys.exit(main())
