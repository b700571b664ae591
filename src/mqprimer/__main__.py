"""``python -m mqprimer ...`` is the ``mqprimer`` command."""

import sys

from mqprimer.cli import main

sys.exit(main())
