"""The app's `--conf` options reach the engine: a bad checkpoint stops the server with its reason."""

from __future__ import annotations

import pytest

from medsam_http.server import LabelServer


def test_missing_checkpoint_stops_the_server_with_a_clear_message(tmp_path):
    missing = tmp_path / "medsam_vit_b.pth"
    (tmp_path / "studies").mkdir()
    server = LabelServer(tmp_path / "studies", tmp_path / "server.log",
                         conf={"model": "medsam-vit-b", "checkpoint": str(missing)})
    with pytest.raises(RuntimeError, match="exited"):
        server.start(timeout=240)
    assert "checkpoint not found" in server.log_tail(400)
    assert str(missing) in server.log_tail(400)
