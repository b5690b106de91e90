"""Test hooks: fault injection and a synthetic network for nettest.

Imported only by the tests and benchmarks, or by a product module when a hook's environment
variable is set (``PGROUPS_NETTEST_FAULT``: :mod:`pgroups.nettest.hooks`); never by a plain run.
"""
