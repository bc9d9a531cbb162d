"""`ppo.trim_update` and `ppo.pack_update` on a mesh: the trimmed GRPO update (KL in the
loss), and the trimmed and packed one (each device's rows packed among themselves), with the
experience's rows split over a (data 2, fsdp 2) mesh of 4 simulated devices equal the plain
padded update on one device (`trim_script.py`, a subprocess: the device count is fixed
before JAX starts)."""

import json
import sys
from pathlib import Path

from processes import run

HERE = Path(__file__).parent


def test_trimmed_and_packed_updates_on_a_mesh_equal_one_device_padded():
    proc = run([sys.executable, str(HERE / "trim_script.py"), str(HERE.parent)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["lengths"] == [4, 4]
    assert "data" in result["response_spec"]  # the cut experience's rows stay split
    for name, diff in result["metrics"].items():
        assert diff < 1e-4, (name, diff)
    assert result["params_max_abs"] < 1e-5
    shards, rows, tokens = result["packed_layout"]
    assert shards == 4 and 1 <= rows <= 2  # 8 rows, 2 per device, packed per device
    assert 1 <= tokens <= 2 * 4  # the response slots of 2 rows of 4 response columns
    assert result["packed_programs"] == [[4, 4, rows, tokens]]
    for name, diff in result["packed_metrics"].items():
        assert diff < 1e-4, (name, diff)
    assert result["packed_params_max_abs"] < 1e-5
