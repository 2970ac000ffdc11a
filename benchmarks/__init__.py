"""Benchmarks of dedalus_async against a bare aiohttp loop and the official SDK.

``python -m benchmarks`` (or ``nox -s bench``) runs them; ``--quick`` is a smoke run of a
few seconds, ``--help`` lists the options. The pieces:

* :mod:`benchmarks.server`: the fake server in its own process, counting requests and
  checking that no client polls before the server's ``retry_after_ms`` has passed;
* :mod:`benchmarks.drivers`: the clients compared, each doing the same 5 requests per
  execution (create, 3 polls, output);
* :mod:`benchmarks.client`: one measurement (one driver, N executions) in a fresh process;
* :mod:`benchmarks.runner`: alternates the drivers round by round and prints medians and
  ratios to the bare aiohttp loop of the same round, as Markdown.

Apart from those, ``python -m benchmarks.local_memory`` (:mod:`benchmarks.local_memory`)
measures what the local backend keeps in memory per byte of output, and what refused
uploads cost it.

The machine these run on is shared and noisy, so absolute times drift from run to run:
read the ratios. ``PROFILE.md`` records what profiling the hot path found and changed.
"""
