import sys

from hellm_ds.cli import main

sys.exit(main())
