"""``pgroups nettest``: the pre-flight network check that names the slow host.

Modules: :mod:`.metrics` (nccl-tests figures, pure), :mod:`.groups` (what is measured and
when, pure), :mod:`.diagnosis` (the robust rule, re-tests, pair tests, naming ranks and
hosts, pure), :mod:`.faults` (the test-only fault injection hook), :mod:`.runner` (what each
rank runs), :mod:`.report` (tables, summary, JSON, plot), :mod:`.cli` (the command).
"""
