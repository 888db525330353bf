"""Benchmarks of ainode against real DICOM peers (run as ``python -m bench.NAME``)."""
