"""`fedpeft doctor` reports a planted stale Ray cluster file and a SuperLink that some
other run left on one of Flower's default ports, without starting anything itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedpeft import doctor
from fedpeft.procs import port_open, tool_path, wait_port

PORT = 39091  # the managed local SuperLink of a plain `flwr run`


def test_doctor_reports_a_stale_ray_cluster_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text("127.0.0.1:1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_TMPDIR", raising=False)

    text = "\n".join(map(str, doctor.diagnose()))

    assert f"stale Ray cluster file {stale}" in text and "'127.0.0.1:1'" in text


@pytest.mark.slow
@pytest.mark.skipif(port_open("127.0.0.1", PORT), reason=f"port {PORT} already in use")
def test_doctor_names_a_foreign_superlink_on_a_default_port(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    link = subprocess.Popen([tool_path("flower-superlink"), "--insecure", "--simulation",
                             "--host", "127.0.0.1", "--port", str(PORT)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_port(PORT, link, timeout=60)
        before = set(psutil.Process().children(recursive=True))
        out = subprocess.run([sys.executable, "-m", "fedpeft.cli", "doctor"],
                             capture_output=True, text=True, timeout=120).stdout
        after = set(psutil.Process().children(recursive=True))
    finally:
        for p in [*psutil.Process(link.pid).children(recursive=True)]:
            p.kill()
        link.kill()
        link.wait()
    assert f"port {PORT} is served by pid {link.pid}" in out, out
    assert "flower-superlink" in out
    assert {p.pid for p in after - before} <= {link.pid}  # doctor started nothing that stayed
