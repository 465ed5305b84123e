"""`python -m relay`: the same as the `tollway` command."""

import sys

from relay.cli import main

sys.exit(main())
