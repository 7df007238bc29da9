"""`python -m weights_convert MODEL SRC DST [--report R.json] [--partial PREFIX ...] [--overwrite] [--num-classes N]`"""
import sys

from weights_convert.cli import build_parser, main, run  # noqa: F401  (re-exported for `segtwin convert`)

if __name__ == "__main__":
    sys.exit(main())
