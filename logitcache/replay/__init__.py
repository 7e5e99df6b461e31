"""An epoch of training batches replayed from the cache: the epoch's plan shuffled into global
batches and each rank's slice (``batches``), every view rendered again from its seed and joined
with its cached teacher rows (``rows``; several teachers' rows and their fixed
combinations: ``teachers``). Serves the trainer and the public API alike.

Imports: ``logitcache.storage``, ``logitcache.views``, ``logitcache.errors``.
"""
