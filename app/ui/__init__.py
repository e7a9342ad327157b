"""The web console at `/ui`: jobs, pairs and their human review, constitutions, training and
workers, server-rendered by the same FastAPI app (Jinja2 templates, htmx, uPlot; every asset is
served from `static/`, nothing from a CDN).

`router.py`: the pages and forms, and `install_console`, which mounts them and makes errors on
console paths pages; `auth.py`: the session cookie and CSRF tokens the Guard (`app/security.py`)
checks; `text_diff.py`: the diffs the pages show.
"""
