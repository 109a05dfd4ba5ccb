"""Benchmarks of unet_ext's ops against stock PyTorch (``python -m benchmarks.run``).

harness.py times named callables interleaved and writes the tables; bench_<op>.py holds one
op's cases; run.py runs them all. References come from unet_ext.reference, as in the tests.
"""
