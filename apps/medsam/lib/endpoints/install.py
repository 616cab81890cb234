"""Everything this app changes in the running MONAI Label server: routes, request guard, auth check."""

from __future__ import annotations

from lib.endpoints import auth, datastore, files, guard, infer, label, server_app, session, tasks


def install(max_upload_bytes: int) -> bool:
    """Put the app's routes in place of MONAI Label's, limit request bodies to `max_upload_bytes`,
    and check tokens when MONAI Label's auth is on. False when no server app is loaded (the CLI,
    a train subprocess)."""
    app = server_app()
    if app is None:
        return False
    app.state.max_upload_bytes = max_upload_bytes
    for module in (infer, label, datastore, session, tasks, files):
        module.install(app)
    auth.install(app)
    guard.install(app, max_upload_bytes)
    return True
