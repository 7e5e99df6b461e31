"""The cache on storage: the manifest (``manifest``), where everything lives and how commits are
recorded and checked (``layout``), a unit's stored arrays per format (``unit_layout``), the
checked reader (``reader``) and whole-unit writer (``writer``), the feature basis (``basis``),
the view canaries (``canary``), the caches under a root (``catalog``) and cache statistics
(``stats``).

Imports: ``logitcache.views``, ``logitcache.codecs``, ``logitcache.errors``.
"""
