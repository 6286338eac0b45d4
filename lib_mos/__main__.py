"""`python -m lib_mos <command>`: the command line lives in `lib_mos.cli.main`."""

import sys

from lib_mos.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
