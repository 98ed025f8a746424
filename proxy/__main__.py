"""`python -m proxy`: the same as the `iso-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())
