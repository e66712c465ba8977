"""``python -m flowhub``: the same as the ``flowhub`` command."""
import sys

from flowhub.cli import main

sys.exit(main())
