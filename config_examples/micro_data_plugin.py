"""A mode added from a file next to the config: ``plugins: [micro_data_plugin.py]`` (a path
relative to the config file) imports this file, and importing it registers the mode.

The micro_data initializer itself ships with pgroups as :mod:`pgroups.plugins.micro_data`
(read it as the example of writing your own initializer); a config may name that module
directly instead: ``plugins: [pgroups.plugins.micro_data]``.
"""
from pgroups.plugins.micro_data import MicroDataInitializer  # noqa: F401  (registers "micro_data")
