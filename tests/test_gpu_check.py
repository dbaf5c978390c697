"""bench/gpu_check.sh on the CPU: its --dry-run plan of a device pass (issue 33's four device
calls), the time limits that keep a STAGES=all call inside one device command, and the GGUF's
parts. The dry run must run nothing: PYTHON names a program that leaves a mark if it is run."""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_TESTS = ["tests/test_ops_cuda.py", "tests/test_decode_attention.py", "tests/test_runtime_cuda.py"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils")


@pytest.fixture
def env(tmp_path):
    marker = tmp_path / "ran"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_python.chmod(0o755)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("LIMIT_", "SMOLLM2_", "STAGES", "BENCHES", "TESTS", "CALL_LIMIT", "GPU_CARRY"))}
    e.update(PYTHON=str(fake_python), OUT=str(tmp_path / "out"), GGUF_STASH=str(tmp_path / "stash"),
             GPU_CARRY=str(tmp_path / "carry"), ADASKIP_GIT_COMMIT="feedc0de", STAGES="all")
    return e


def dry_run(env, **extra):
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env={**env, **extra}, capture_output=True, text=True,
                       timeout=60)
    return r


def stages(out: str):
    """(name, limit, command) of each planned stage, in order."""
    found = re.findall(r"^stage (\S+)\s+limit\s+(\d+) s, .*\n  (timeout .*)$", out, re.M)
    return [(name, int(limit), cmd) for name, limit, cmd in found]


def assert_nothing_ran(env):
    tmp = Path(env["OUT"]).parent
    assert not (tmp / "ran").exists(), "the dry run ran PYTHON"
    assert not Path(env["OUT"]).exists() and not Path(env["GGUF_STASH"]).exists()


def test_all_plans_the_issues_device_calls_under_the_command_limit(env):
    r = dry_run(env)
    assert r.returncode == 0, r.stderr
    assert_nothing_ran(env)
    plan = stages(r.stdout)
    assert [s[0] for s in plan] == ["build", "tests", "e2e-decode", "decode", "speculative"]
    for name, limit, cmd in plan:
        assert cmd.startswith(f"timeout -k 10 {limit} "), cmd  # each stage under its own limit
        assert cmd.endswith(f"> {env['OUT']}/" + ("build.log" if name == "build" else
                                                   "pytest.log" if name == "tests" else f"bench_{name}.log"))
    tests_cmd = plan[1][2]
    assert tests_cmd.split(" -p no:cacheprovider ")[1].split(" >")[0].split() == GPU_TESTS
    assert "bench e2e --config llama-3.1-8b --prompt-lens 8192,32768" in plan[2][2]
    assert f"--out {env['OUT']}/e2e-decode.json" in plan[2][2]
    assert "bench kernels --only-decode" in plan[3][2]
    assert "bench speculative --config llama-3.1-8b" in plan[4][2]
    total = sum(limit for _, limit, _ in plan)
    assert f"total of the limits: {total} s; call limit 570 s" in r.stdout
    assert total <= 570 < 600  # one device command, with room for the environment report
    assert "ADASKIP_GIT_COMMIT=feedc0de (passed through" in r.stdout
    # no GGUF here: the embedded stage says why it does not run, and the later calls are named
    assert re.search(r"^stage speculative-embedded: not run: SMOLLM2_GGUF is not set", r.stdout, re.M)
    assert "2. STAGES=carry" in r.stdout and "3. STAGES=bench BENCHES=speculative-embedded" in r.stdout
    need = int(re.search(r"^worst case: .* = (\d+) s of 900 s$", r.stdout, re.M).group(1))
    assert need <= 900


def test_limits_can_be_set_and_a_bad_one_is_refused(env):
    plan = dict((n, lim) for n, lim, _ in stages(dry_run(env, LIMIT_DECODE="45", LIMIT_E2E_DECODE="100").stdout))
    assert plan["decode"] == 45 and plan["e2e-decode"] == 100
    r = dry_run(env, LIMIT_TESTS="2m")
    assert r.returncode == 2 and "LIMIT_TESTS must be a positive number of seconds, got '2m'" in r.stderr
    r = dry_run(env, STAGES="tests sideways")
    assert r.returncode == 2 and "unknown stage 'sideways'" in r.stderr


def test_a_stage_past_the_call_limit_is_marked_as_starting_only_if_time_is_left(env, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    r = dry_run(env, SMOLLM2_GGUF=str(gguf))
    assert r.returncode == 0, r.stderr
    assert_nothing_ran(env)
    plan = stages(r.stdout)
    assert plan[-1][0] == "speculative-embedded" and f"--model {gguf} --device cuda" in plan[-1][2]
    line = next(l for l in r.stdout.splitlines() if l.startswith("stage speculative-embedded"))
    assert "starts only if the stages before end early (worst case 540 s + 150 s > 570 s)" in line
    assert "device calls" not in r.stdout  # the GGUF is here: no later calls needed


def test_gguf_parts_are_counted_and_joined_only_when_all_are_there(env, tmp_path):
    carry = Path(env["GPU_CARRY"])
    carry.mkdir()
    (carry / "smollm2.part-1-of-3").write_bytes(b"a")
    r = dry_run(env)
    assert "parts of the GGUF so far: smollm2.part-1-of-3 (of 3)" in r.stdout
    # the other parts were stashed by earlier calls on the same machine
    stash = Path(env["GGUF_STASH"])
    stash.mkdir()
    for k in (2, 3):
        (stash / f"smollm2.part-{k}-of-3").write_bytes(b"b")
    r = dry_run(env)
    assert r.returncode == 0, r.stderr
    assert stages(r.stdout)[-1][0] == "speculative-embedded"
    assert f"--model {stash}/SmolLM2-135M-Instruct.Q4_1.gguf" in stages(r.stdout)[-1][2]
    assert sorted(p.name for p in stash.iterdir()) == ["smollm2.part-2-of-3", "smollm2.part-3-of-3"]  # untouched
    # the device calls still carry one part each: the first call's limits leave the embedded stage out
    first = sum(limit for name, limit, _ in stages(r.stdout) if name != "speculative-embedded")
    assert f"1. STAGES=all, timeout_s 600, carry {carry}/smollm2.part-1-of-3 {carry}/smollm2.sha256: {first} s" in r.stdout
    assert "3. STAGES=bench BENCHES=speculative-embedded LIMIT_BUILD=60" in r.stdout


def test_split_gguf_cuts_a_file_into_parts_that_join_to_it(env, tmp_path):
    src = tmp_path / "model.gguf"
    data = os.urandom(100_000)
    src.write_bytes(data)
    r = subprocess.run(["bash", str(SCRIPT), "--split-gguf", str(src)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    carry = Path(env["GPU_CARRY"])
    parts = sorted(carry.glob("smollm2.part-*"))
    assert [p.name for p in parts] == ["smollm2.part-1-of-1"]  # 100 kB fits beside the tree
    assert b"".join(p.read_bytes() for p in parts) == data
    digest = (carry / "smollm2.sha256").read_text().split()
    assert digest == [hashlib.sha256(data).hexdigest(), "SmolLM2-135M-Instruct.Q4_1.gguf"]
