"""Benchmarks of rlhf_jax against the tools users would pick instead, and against the hardware.

Each module is a script: `python -m bench.<name> [--size tiny|full]`. It prints one table and
writes it into BENCHMARKS.md between `<!-- bench:<name> -->` markers. See BENCHMARKS.md.
"""
