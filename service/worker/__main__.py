"""``python -m service.worker``: see :mod:`service.worker.process`."""

from service.worker.process import main

main()
