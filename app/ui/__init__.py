"""The web console at `/ui`: jobs, pairs and their human review, constitutions, training and
workers, server-rendered by the same FastAPI app (Jinja2 templates, htmx, uPlot; every asset is
served from `static/`, nothing from a CDN).

`pages/`: one module per page (`auth` for the way in, `jobs`, `pairs`, `constitutions`,
`training`, `workers`); `forms.py`: the posted form once its CSRF token is good, its fields, and
refusals shown where they happened; `render.py`: templates, pages, fragments, redirects and the
security headers; `router.py`: the one router under `/ui` and `install_console`, which mounts it and
makes errors on console paths pages; `auth.py`: the session cookie and CSRF tokens the Guard
(`app/security.py`) checks; `text_diff.py`: the diffs the pages show. Pages read through the core's
queries and `app/views.py`, and act through `core/services.py`, never through the API's routes.
"""
