"""Benchmarks (``hpctrain bench ...``) and the comparison report (``hpctrain report``)."""
