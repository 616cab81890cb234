"""Everything this app changes in the running MONAI Label server: routes, request guard, auth check,
error answers."""

from __future__ import annotations

from fastapi import FastAPI

from lib.endpoints import (auth, datastore, errors, files, guard, infer, ohif_box, replace_routes, server_app, session,
                           tasks)


def replace_all(app: FastAPI) -> None:
    """The app's routes in place of MONAI Label's (under MONAI_LABEL_API_STR, as MONAI Label's are;
    /reload outside it, as MONAI Label's is). Each router goes before the ones replaced earlier."""
    for router in (infer.router, datastore.router, session.router, tasks.router, files.router):
        replace_routes(router, app)
    replace_routes(tasks.root, app, prefix="")
    ohif_box.install(app)  # after files: its /ohif/app-config.js before /ohif/{path}


def install(max_upload_bytes: int, allow_remote: bool = False) -> bool:
    """Put the app's routes in place of MONAI Label's, limit request bodies to `max_upload_bytes`,
    refuse URL paths that walk up and other hosts unless `allow_remote`, answer errors by one table
    (errors.py), and check tokens when MONAI Label's auth is on. False when no server app is loaded
    (the CLI, a train subprocess)."""
    app = server_app()
    if app is None:
        return False
    app.state.max_upload_bytes = max_upload_bytes
    replace_all(app)
    auth.install(app)
    errors.install(app)
    guard.install(app, max_upload_bytes, allow_remote)
    app.middleware_stack = app.build_middleware_stack()  # Starlette built it at start-up, without the above
    return True
