"""``pgroups nettest``: the pre-flight network check that names the slow host.

Pure decisions: :mod:`.metrics` (nccl-tests figures), :mod:`.groups` (what is measured and
when), :mod:`.diagnosis` (the robust rule, re-tests), :mod:`.linkscan` / :mod:`.verdict` /
:mod:`.judging` (the link scan and the last word), :mod:`.preflight` (drift, compute,
corruption). The impure driver: :mod:`.runner` (one rank's run), :mod:`.steps` (the steps),
:mod:`.bench` (the data plane: the one place that issues and waits), :mod:`.control` (the
store protocol), :mod:`.failure` (hangs and aborted runs), :mod:`.probe` (pre-flight facts and
matmul), :mod:`.startup`, :mod:`.report`, :mod:`.cli`. Test hooks live in :mod:`pgroups.testing`
and load only through :mod:`.hooks` when ``PGROUPS_NETTEST_FAULT`` is set.
"""
