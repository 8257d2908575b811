"""uWSGI without ``py-call-uwsgi-fork-hooks``: start the guard in each worker.

uWSGI then forks its workers from C and Python's at-fork hooks never run.
A guard thread running in the master at that moment could hold the GIL
and leave the worker stuck, so the master must not run one (leave
THPGUARD_GUARD unset for it) and each worker starts its own:

    uwsgi --master --workers 4 --enable-threads --import uwsgi_guard \\
          --http-socket 127.0.0.1:8000 --module wsgi_app:application
"""

import os

import thpguard
from uwsgidecorators import postfork


@postfork
def start_guard():
    # The first thpguard call in the worker notices the fork (the native
    # fork counter) and handles it: copy regions become the worker's own.
    interval = os.environ.get("THPGUARD_GUARD_INTERVAL")
    thpguard.install(interval=float(interval) if interval else None)
