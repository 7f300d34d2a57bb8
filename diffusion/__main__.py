"""`python -m diffusion ...` runs the `spacetime` command line."""

from diffusion.cli import console

if __name__ == "__main__":
    console()
