"""``python -m fedseg ...``: the same as the ``fedseg`` command."""

import sys

from fedseg.cli import main

sys.exit(main())
