"""Dataset sources (tar shards, image folders) and the embedded dataset generators."""

from logitcache.data.digits import generate_digits
from logitcache.data.shards import write_dataset
from logitcache.data.source import SampleSource, ShardInfo, open_source
from logitcache.data.synth import generate_synth

__all__ = ["SampleSource", "ShardInfo", "generate_digits", "generate_synth", "open_source", "write_dataset"]
