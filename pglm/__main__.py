import sys

from pglm.cli import main

sys.exit(main())
