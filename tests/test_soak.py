"""The soak's verdicts (scripts/soak.py): what counts as growing without bound and as resuming,
and a short real run in which one node is killed with SIGKILL and must carry on from its
checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import soak  # noqa: E402

MB = 2**20


def _every_10s(values: list) -> list[tuple[float, object]]:
    return [(10.0 * k, v) for k, v in enumerate(values)]


def test_a_steady_figure_does_not_grow_and_a_leak_does() -> None:
    steady = [300 * MB + (k % 3) * MB for k in range(60)]  # noise of a few MB around a level
    assert soak.grew(_every_10s(steady), "rss_bytes") is None
    leak = [300 * MB + k * 2 * MB for k in range(60)]  # 2 MB per sample
    assert soak.grew(_every_10s(leak), "rss_bytes") > 16 * MB
    assert soak.grew(_every_10s([10 + k for k in range(60)]), "open_fds") > 4  # a socket more per sample
    assert soak.grew(_every_10s([10] * 30 + [11] * 30), "open_fds") is None  # one more for good is no leak
    # Files climbing while the node meets its peers (its first 2 minutes), then flat: not a leak.
    assert soak.grew(_every_10s([10 + 5 * k for k in range(12)] + [70] * 30), "open_fds") is None
    assert soak.grew(_every_10s([10 + 5 * k for k in range(12)]), "open_fds") is None  # too short a life to say
    assert soak.grew(_every_10s([None] * 5 + steady), "rss_bytes") is None  # missing readings are skipped


def test_a_restart_resumes_only_from_its_checkpoint_with_its_accuracy() -> None:
    before = {"step": 1040, "accuracy": 0.95}
    assert soak.resumed(before, 1000, {"step": 1003, "accuracy": 0.945}, 0.02) is None
    assert "afresh" in soak.resumed(before, 1000, {"step": 12, "accuracy": 0.95}, 0.02)
    assert "lost more than 0.02" in soak.resumed(before, 1000, {"step": 1001, "accuracy": 0.90}, 0.02)
    # caught up with better neighbours before its first reading after the restart: resumed all the same
    assert soak.resumed(before, 1000, {"step": 1254, "accuracy": before["accuracy"] + 0.03}, 0.02) is None
    assert "no checkpoint" in soak.resumed(before, None, {"step": 5, "accuracy": 0.95}, 0.02)
    assert "no accuracy" in soak.resumed({"step": 9}, 1000, {"step": 1001, "accuracy": 0.9}, 0.02)


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports above it on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            probes = []
            for k in range(n):
                p = socket.socket()
                probes.append(p)
                p.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for p in probes:
                p.close()
    raise RuntimeError("no free ports")


@pytest.mark.slow
def test_a_killed_node_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Two real node processes; one is SIGKILLed and restarted: its step carries on from its
    checkpoint and its accuracy is where it was (the soak's own check, run for real)."""
    verdict = tmp_path / "verdict.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--nodes", "2", "--minutes", "0.1", "--warmup", "1",
         "--churn-every", "60", "--kill", "1", "--down", "0.5", "--every", "3",
         "--base-port", str(_free_ports(2)), "--state-dir", str(tmp_path / "state"), "--json", str(verdict)],
        capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(verdict.read_text())
    [restart] = result["restarts"]
    assert restart["resumed"], restart
    assert 0 < restart["checkpoint_step"] <= restart["step_after"]
    assert restart["checkpoint_step"] <= restart["step_before"]
    assert result["exit_codes"] == [0, 0]  # both nodes, the restarted one too, stopped cleanly
    assert all(r["rss_bytes"] > 0 and r["open_fds"] > 0 and r["tasks"] > 0 for r in result["last"])
    assert "restarts resumed: 1/1" in run.stdout
