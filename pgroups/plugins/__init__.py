"""Initializers that ship with pgroups but are not built-in modes: a config turns one on by
listing its module under ``plugins:`` (importing it registers the mode) and the mode under
``extra_modes:``.

- :mod:`pgroups.plugins.micro_data` — verl's micro-data-parallel groups (``micro_data``), which
  :mod:`pgroups.reshard.verl` uses.
"""
