"""logitcache benchmarks: ``python -m bench.run [--quick] [--only NAME,...] [--device auto|cpu|cuda]``.

One module per benchmark (build, train_step, reader, frontier, scale). Each has
``run(ctx) -> dict`` (settings, results, summary), ``markdown(data) -> str`` and
``plot(data, outdir) -> list[str]``; ``bench.run`` writes ``bench/results/<name>.json`` and
``bench.report`` turns every JSON file present into ``bench/RESULTS.md``.
"""
