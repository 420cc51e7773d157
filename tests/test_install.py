"""The wheel ships conf/ and the plugins' configs: configs compose from an installed package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

SCRIPT = """
import json, sys
from layerkit.config import compose, core_config_dir
from layerkit.registry import get_registry
cfg = compose("train", ["+experiment=layerflow_stage3", "backbone=cogvideox_tiny"], get_registry())
print(json.dumps({"conf": str(core_config_dir()), "backbone": cfg.backbone.name, "task": cfg.task.name}))
"""


def test_configs_compose_from_an_installed_wheel(tmp_path):
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                            str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel offline here: {build.stderr[-300:]}")
    wheel = next(dist.glob("layerkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "layerkit/conf/train.yaml" in names and "layerkit_plugins/toy/conf/experiment/toy_layered.yaml" in names
    assert "layerkit_plugins/layerflow/conf/experiment/layerflow_stage3.yaml" in names

    # the wheel into a folder of its own, run by this interpreter (its dependencies are this
    # environment's, a venv's or the system's: a nested venv would see the base interpreter only)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    # run from an empty directory, with the installed copy first on the path (not the checkout)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["conf"].startswith(str(tmp_path / "site")), result
    assert result["backbone"] == "cogvideox" and result["task"] == "layered"


def test_pkg_resolver_names_files_inside_packages(registry):
    from pathlib import Path

    from layerkit.config import compose

    cfg = compose("sample", ["+weights_dir=${pkg:layerkit_plugins.toy/backbone.py}"], registry)
    assert Path(cfg.weights_dir).is_file()
