"""Run the bales-stream service: ``python consumer.py`` (same as ``bales-stream serve``)."""

import sys

from bales_stream.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
