"""`python -m steerserve.server ...` is the `steerserve` command."""
import sys

from .cli import main

sys.exit(main())
