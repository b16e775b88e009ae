"""``python -m dicomflow``: the same as the ``dicomflow`` command."""

import sys

from dicomflow.cli import main

sys.exit(main())
