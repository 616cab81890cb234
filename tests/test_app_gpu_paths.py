"""The app's GPU-side choices that a CPU can show: the `gpus` option, and MONAI Label's task
subprocesses (train, info, scoring) leaving the GPU to the training model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app_helpers import REPO_ROOT, SAMPLE_DIR

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))

from lib.configs.medsam import task_subprocess_method  # noqa: E402
from lib.trainers.medsam import DEFAULTS, gpu_ids  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402


def test_gpus_option_picks_the_devices_to_train_on():
    assert DEFAULTS["gpus"] == "all" and gpu_ids("all", 4) == [0, 1, 2, 3] and gpu_ids("", 2) == [0, 1]
    assert gpu_ids("2", 4) == [2] and gpu_ids("0, 3", 4) == [0, 3]
    for bad in ("x", "4", "1,1", "-1", ","):
        with pytest.raises(MONAILabelException, match="gpus"):
            gpu_ids(bad, 4)


def test_task_subprocess_is_recognised():
    app = os.path.join("site-packages", "monailabel", "interfaces", "utils", "app.py")
    assert task_subprocess_method([app, "-a", "x", "-m", "train", "-r", "{}"]) == "train"
    assert task_subprocess_method([app, "--method", "scoring"]) == "scoring"
    assert task_subprocess_method(["monailabel", "start_server", "-m", "train"]) is None


def test_train_subprocess_loads_the_inference_model_on_the_cpu(tmp_path: Path):
    """MONAI Label's train subprocess builds the whole app, infer task included. With
    `--conf device cuda` there it must not load the inference model on the GPU (the training
    model needs it): on this CPU-only machine a load on cuda fails at start; on the CPU the app
    is built and the train task itself answers (here: nothing labelled to train on)."""
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies, ignore=shutil.ignore_patterns("labels"))
    env = {**os.environ, "MONAI_LABEL_APP_CONF": json.dumps({"device": "cuda", "model_dir": str(tmp_path / "model")}),
           "PYTHONPATH": str(REPO_ROOT / "lib")}
    run = subprocess.run([sys.executable, "-m", "monailabel.interfaces.utils.app", "-a", str(REPO_ROOT / "apps" / "medsam"),
                          "-s", str(studies), "-m", "train", "-r", json.dumps({"model": "medsam"})], env=env,
                         capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert "no final labels to train on" in output, output[-3000:]
    assert "NVIDIA" not in output and "CUDA" not in output, output[-3000:]  # no load on the GPU was tried
