"""The pretokenize stage (``omni pretokenize``): shards -> WebDataset token shards per
bucket. :mod:`.stage` drives a pool of Ray actors; :mod:`.worker` is what one actor does
with one shard; :mod:`.config` is the section (no torch or Ray)."""
