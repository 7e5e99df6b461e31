"""Checking a cache against its teacher: re-render a seeded sample of committed views, re-run
the teacher (``run``), compare per codec (``compare``) and report (``report``).

Imports: ``logitcache.build`` (the teacher), ``logitcache.storage``, ``logitcache.views``,
``logitcache.codecs``, ``logitcache.data``, ``logitcache.distributed``, ``logitcache.errors``.
"""
