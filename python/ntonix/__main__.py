"""`python -m ntonix` runs the command-line interface."""

from ntonix.cli import main

if __name__ == "__main__":
    main()
