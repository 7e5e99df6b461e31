"""The cache on storage: the manifest (``manifest``; its schema, checked before use:
``manifest_schema``), where everything lives and how commits are
recorded and checked (``layout``), a unit's stored arrays per format (``unit_layout``), the
checked reader (``reader``) and whole-unit writer (``writer``), the feature basis (``basis``),
the view canaries (``canary``), the caches under a root (``catalog``), cache statistics
(``stats``) and whether caches hold the same views (``views_compat``).

Imports: ``logitcache.views``, ``logitcache.codecs``, ``logitcache.errors``.
"""
