"""What `flwr run` uploads: the app's code and configs, never run outputs, virtual
environments, a Flower home or caches that happen to sit inside the app directory."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parents[2]
PLANTED = ["runs/r1/metrics.jsonl", ".venv/lib/site.py", "flwr_home/config.toml",
           ".cache/models/config.json", "sub/flwr_home/config.toml"]


def test_app_upload_excludes_outputs_envs_flower_home_and_caches(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs",
                                                             "__pycache__", "bench"))
    for rel in PLANTED:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("{}")

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()

    assert "server/app.py" in names and "configs/config.yaml" in names
    assert [n for n in names if n in PLANTED] == []
