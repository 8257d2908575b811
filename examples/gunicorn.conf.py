# gunicorn.conf.py: a pre-forking server whose workers keep their huge pages.
#
#   THPGUARD_GUARD=1 gunicorn -c gunicorn.conf.py wsgi_app:application
#
# THPGUARD_GUARD=1 installs the guard when the app imports thpguard (in the
# master, thanks to preload_app). gunicorn forks its workers with os.fork(),
# whose at-fork hooks restart the guard in each worker: no server hook is
# needed.
bind = "127.0.0.1:8000"
workers = 4
worker_class = "sync"
preload_app = True  # import the app, and allocate its hot buffer, once
