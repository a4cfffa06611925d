"""batchlm.pipelines: the batch job, `python -m batchlm run|validate|status`.

A YAML config (config.py) plans an input into deterministic work units
(sources.py); uncommitted units flow through Ray Data, read+render tasks
(render.py, stages.py) then an actor pool of batchlm engines (stages.py); the
driver (runner.py) commits one Parquet shard per unit atomically (storage.py)
and keeps the output's manifest (manifest.py), so a rerun resumes with every
row exactly once. Heavy imports (Ray, pyarrow, pydantic) happen only inside
the modules that need them; cli.py imports the standard library alone.
"""
