"""Where samples come from: tar shards and image folders as one random-access
:class:`SampleSource` (``source``, with its shard indexes, ranged reads and local shard copies),
and the embedded datasets written as tar shards (``synth``, ``digits``, ``shards``).

Imports: ``logitcache.errors`` only.
"""

from logitcache.data.digits import generate_digits
from logitcache.data.shards import write_dataset
from logitcache.data.source import SampleSource, ShardInfo, open_source
from logitcache.data.synth import generate_synth

__all__ = ["SampleSource", "ShardInfo", "generate_digits", "generate_synth", "open_source", "write_dataset"]
