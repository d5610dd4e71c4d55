"""A Space's entry point (Spaces run `python app.py`): the web demo of `oisa app`, which takes the same arguments."""

import sys

from oisa_cli.main import main


if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
