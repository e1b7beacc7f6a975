"""Run a Python snippet in a fresh CPU process with N host devices (set before JAX starts)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_devices_env(devices: int, **extra) -> dict:
    """This environment on the CPU with `devices` host devices; other XLA_FLAGS (e.g.
    --xla_cpu_max_isa=AVX2) are kept, so a whole-suite run with them reaches subprocesses too."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=" ".join(flags), **extra)


def run_python(script: str, *args: str, devices: int = 1, timeout: int = 300) -> str:
    """stdout of `python -c script args...`; fails the test with the output if it fails."""
    env = host_devices_env(devices)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout
