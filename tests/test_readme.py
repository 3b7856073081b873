"""Every ``bash`` block of the README runs as written: each command, with node counts, steps,
durations, seeds and sweep grids scaled down where a flag allows (the same flags otherwise), exits 0.

Run from a scratch folder that sees the repository's ``scripts/`` and ``topologies/``, so run
folders never collide with a developer's. Not run here, with the reason: ``pip install`` (CI does
it before the tests), the test command itself, ``gossipfl node`` on a LAN address with mDNS (traffic beyond loopback:
`tests/test_multihost.py` runs those commands in network namespaces), ``--device cuda`` without
a GPU.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CAPS = {"--nodes": 16, "--steps": 6, "--duration": 2, "--workers": 1}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def skip_reason(cmd: str) -> str | None:
    if cmd.startswith(("pip ", "python3 -m pip")):
        return "installs: CI runs its own install first"
    if "-m pytest" in cmd:
        return "the test suite itself (CI runs it)"
    if cmd.startswith("gossipfl node"):
        return "a node on a LAN address (mDNS, or a LAN IP): tests/test_multihost.py runs it in network namespaces"
    if "--device cuda" in cmd and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


def scaled(cmd: str) -> list[str]:
    """``cmd`` as argv, scaled down: counts capped (`CAPS`), one seed, two values per sweep grid,
    a short run for a command that gives no steps."""
    argv = shlex.split(cmd)
    out: list[str] = []
    k = 0
    while k < len(argv):
        a = argv[k]
        if a in CAPS and k + 1 < len(argv):
            out += [a, str(min(float(argv[k + 1]), CAPS[a])).removesuffix(".0")]
            k += 2
            continue
        if a == "--seeds" and k + 1 < len(argv):
            out += [a, argv[k + 1].split(",")[0]]
            k += 2
            continue
        if a == "--grid" and k + 1 < len(argv):
            key, _, values = argv[k + 1].partition("=")
            cap = CAPS.get(f"--{key}")
            vals = [str(min(float(v), cap)).removesuffix(".0") if cap is not None else v for v in values.split(",")]
            out += [a, f"{key}={','.join(list(dict.fromkeys(vals))[:2])}"]  # capped like the flags, two at most
            k += 2
            continue
        out.append(a)
        k += 1
    if out[:2] == ["gossipfl", "sim"] and "--steps" not in out and "--duration" not in out:
        out += ["--steps", str(CAPS["--steps"])]
    if out[:2] == ["gossipfl", "sweep"]:
        out += ["--grid", f"steps={CAPS['--steps']}"]
    return out


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [c for block in bash_blocks(text) for c in commands(block)]


def test_the_readme_has_commands_to_run() -> None:
    cmds = readme_commands()
    assert any(c.startswith("gossipfl sim") for c in cmds)
    assert any(c.startswith("gossipfl sweep") for c in cmds)
    assert scaled("gossipfl sweep --grid a=1,2,3 --seeds 0,1 --nodes 99") == \
        ["gossipfl", "sweep", "--grid", "a=1,2", "--seeds", "0", "--nodes", "16", "--grid", "steps=6"]
    capped = ["gossipfl", "sweep", "--grid", "nodes=16", "--grid", "steps=6"]
    assert scaled("gossipfl sweep --grid nodes=16,64") == capped


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``gossipfl`` commands run in this process (`gossipfl.cli.main`: the entry point's own
    code, without a torch import per command); anything else in a subprocess."""
    from gossipfl.cli import main

    for name in ("scripts", "topologies"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    ran, failed = 0, []
    for cmd in readme_commands():
        if skip_reason(cmd):
            continue
        argv = scaled(cmd)
        if any("*" in a for a in argv):  # a shell glob: expand it as the shell would
            argv = [x for a in argv for x in (sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob(a))
                                               if "*" in a else [a])]
        if argv[0] == "gossipfl":
            code, out = main(argv[1:]), capsys.readouterr()
            text = out.err or out.out
        else:
            proc = subprocess.run([sys.executable if argv[0] == "python3" else argv[0], *argv[1:]],
                                  cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=300)
            code, text = proc.returncode, proc.stderr or proc.stdout
        ran += 1
        if code != 0:
            failed.append(f"{cmd}\n  -> exit {code}: {text[-500:]}")
    assert ran >= 8
    assert not failed, "\n".join(failed)
