"""Benchmark workloads: each module defines ``WORKLOADS: list[Workload]`` (see ``api.py``)."""
