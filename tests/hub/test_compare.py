"""Comparing two versions side by side: the library call and the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import oneflow as flow

import flowhub
from conftest import make_repo

REPO = "flowhub-examples/tiny-models"
FLOWHUB = os.path.join(os.path.dirname(sys.executable), "flowhub")


def test_compare_two_refs_reports_exactly_the_differences(gh):
    result = flowhub.Hub().compare(f"{REPO}:v0.1", f"{REPO}:v0.2", "tinynet", pretrained=True, trust_repo=True)
    assert result.entrypoints_added == ["labels"] and result.entrypoints_removed == []
    assert result.reshaped == {"features.4.weight": ([16, 8, 3, 3], [16, 8, 5, 5])}
    assert not result.tensors_added and not result.tensors_removed and not result.retyped
    # v0.2's weights were drawn with another seed: every other parameter differs, buffers do not
    changed = {d.name for d in result.changed}
    assert changed == {"features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                       "features.4.bias", "classifier.weight", "classifier.bias"}
    assert all(d.max_abs_diff > 0 for d in result.changed)
    assert result.output_max_abs_diff > 0 and result.input_shapes == [[2, 3, 32, 32]]
    assert not result.identical and "reshaped" in result.format_table()


def test_compare_identical_refs_reports_nothing(gh):
    x = flow.randn(1, 3, 32, 32)
    result = flowhub.Hub().compare(f"{REPO}:v0.1", f"{REPO}:v0.1", "tinynet", pretrained=True, inputs=x,
                                   trust_repo=True)
    assert result.identical and result.changed == [] and result.output_max_abs_diff == 0.0
    assert result.unchanged == 11


def test_compare_value_only_change_and_local_folder(gh, hub_root, tmp_path):
    code = ("import oneflow as flow, oneflow.nn as nn\n"
            "def lin(scale=1.0):\n    m = nn.Linear(4, 2)\n    flow.nn.init.constant_(m.weight, scale)\n"
            "    flow.nn.init.zeros_(m.bias)\n    return m\n")
    make_repo(hub_root, "cmp", "lin", {"hubconf.py": code})
    local = tmp_path / "local_lin"
    local.mkdir()
    (local / "hubconf.py").write_text(code + "def extra():\n    return 1\n")
    result = flowhub.Hub().compare("cmp/lin", str(local), "lin", scale=1.0, trust_repo=True)
    assert result.identical is False and result.entrypoints_added == ["extra"] and result.changed == []
    result = flowhub.Hub().compare("cmp/lin", "cmp/lin", "lin", trust_repo=True)
    assert result.identical
    two = flowhub.Hub().compare(str(local), str(local), "lin", 2.0)
    assert two.identical


def test_compare_command_table_and_json(gh):
    args = [FLOWHUB, "compare", f"{REPO}:v0.1", f"{REPO}:v0.2", "tinynet", "pretrained=True", "--trust"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "reshaped   features.4.weight" in proc.stdout and "(16, 8, 3, 3) -> (16, 8, 5, 5)" in proc.stdout
    assert proc.stdout.rstrip().endswith("different")
    proc = subprocess.run(args + ["--json", "--input-shape", "1x3x32x32"], capture_output=True, text=True, timeout=180)
    data = json.loads(proc.stdout)
    assert data["reshaped"] == {"features.4.weight": [[16, 8, 3, 3], [16, 8, 5, 5]]}
    assert data["input_shapes"] == [[1, 3, 32, 32]] and data["identical"] is False
