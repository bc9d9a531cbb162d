#!/usr/bin/env python3
"""Start N processes of one command on this machine, wired together as one JAX run.

The same code path as a multi-host pod: each process gets JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, and `rlhf-jax` calls `jax.distributed.initialize` from
them (with gloo collectives on CPU). Each process simulates `--devices-per-process` CPU
devices. Output of process i goes to OUTPUT_DIR/process_i.log when --log-dir is given,
else process 0 prints to this terminal and the others are quiet.

    python launch/local_multiprocess.py --processes 2 --devices-per-process 2 -- \\
        rlhf-jax pipeline --config configs/quickstart.yaml --output out/mp mesh.data=4

Exit status: 0 when every process succeeds, else the first failing process's status.

All processes share this machine's cores, so a process can be starved of CPU for long
stretches while it is healthy (a loaded laptop or CI machine). The coordinator would take
such a process for dead after JAX's 100 s without a heartbeat; this launcher raises that to
`--heartbeat-timeout` seconds (RLHF_JAX_HEARTBEAT_TIMEOUT_S) unless the environment already
sets it. A real pod keeps JAX's default, which detects a lost host sooner.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds, then kill all")
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=600,
        help="seconds without a heartbeat before a process is taken for dead (JAX: 100)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and a command after --")

    port = free_port()
    procs = []
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.processes):
        env = dict(os.environ)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(args.processes),
            JAX_PROCESS_ID=str(i),
            JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
            RLHF_JAX_HEARTBEAT_TIMEOUT_S=env.get(
                "RLHF_JAX_HEARTBEAT_TIMEOUT_S", str(args.heartbeat_timeout)
            ),
            XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} "
            f"--xla_force_host_platform_device_count={args.devices_per_process}".strip(),
        )
        if args.log_dir:
            out = (args.log_dir / f"process_{i}.log").open("w")
        else:
            out = None if i == 0 else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT if out is not None else None
            )
        )
    status = 0
    try:
        for p in procs:
            rc = p.wait(timeout=args.timeout)
            status = status or rc
    except subprocess.TimeoutExpired:
        status = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return status


if __name__ == "__main__":
    sys.exit(main())
