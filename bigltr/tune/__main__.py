"""`python -m bigltr.tune`: bigltr-tune (trial workers of --workers K are started this way)."""
import sys

from bigltr.tune.cli import main

sys.exit(main())
