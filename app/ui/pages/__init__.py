"""The console's pages, one module each; `app/ui/router.py` mounts their routers in this order:
`auth` (the way in: `/ui/`, login, logout), `jobs`, `pairs`, `constitutions`, `training`, `workers`."""
