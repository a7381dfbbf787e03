"""``python -m loadgen.bench``: see :mod:`loadgen.bench.cli`."""

from loadgen.bench.cli import main

main()
