"""``python -m harness.cli``, as the ``clipkd`` script."""
import sys

from harness.cli import main

sys.exit(main())
