"""Benchmarks: speed and quality against geoopt, geotorch, torch's parametrizations and
torch.optim, in the same run. Results (Markdown tables, PNG plots) go to
``benchmarks/results/``. Run everything with ``python -m benchmarks`` (or ``make bench``),
one topic with ``python -m benchmarks.<topic>``. Benchmarks are never timed tests.
"""
