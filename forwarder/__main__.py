"""``python -m forwarder``: the same as the ``forwarder`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
