"""`python -m mocobench ...` is the `mocobench` command."""
import sys

from mocobench.cli import main

sys.exit(main())
