"""The shard stage (``omni shard``): raw corpus -> validated, balanced Parquet shards.

:mod:`.readers` (one per input format) turn inputs into :mod:`.documents`; :mod:`.plan`
and :mod:`.packing` group their splits into balanced shards; :mod:`.validation` and
:mod:`.media_checks` accept or quarantine each document; :mod:`.stage` runs it on Ray.
:mod:`.config` (the ``shard`` section) and :mod:`.fingerprints` (what the stage writes and
the plan expects) import neither Ray nor a media library.
"""
