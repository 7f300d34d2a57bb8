"""`python -m diffusion ...` runs the `spacetime` command line."""

import sys

from diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
