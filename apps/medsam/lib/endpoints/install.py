"""Everything this app changes in the running MONAI Label server: routes, request guard, auth check."""

from __future__ import annotations

from lib.endpoints import auth, datastore, errors, files, guard, infer, label, ohif_box, server_app, session, tasks


def install(max_upload_bytes: int, allow_remote: bool = False) -> bool:
    """Put the app's routes in place of MONAI Label's, limit request bodies to `max_upload_bytes`,
    refuse URL paths that walk up and other hosts unless `allow_remote`, answer 422 to any invalid
    input, and check tokens when MONAI Label's auth is on. False when no server app is loaded (the CLI,
    a train subprocess)."""
    app = server_app()
    if app is None:
        return False
    app.state.max_upload_bytes = max_upload_bytes
    for module in (infer, label, datastore, session, tasks, files, ohif_box):  # ohif_box after files
        module.install(app)
    auth.install(app)
    errors.install(app)
    guard.install(app, max_upload_bytes, allow_remote)
    app.middleware_stack = app.build_middleware_stack()  # Starlette built it at start-up, without the above
    return True
