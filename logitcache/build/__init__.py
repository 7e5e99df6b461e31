"""Running a teacher over every view into a cache: the teacher (``teacher``: names, weights,
input adaptation, inference), the units still to write as planned batches (``units``), the
feature basis and rows of ``build --features`` (``features``) and the build loop (``loop``).

Imports: ``logitcache.storage``, ``logitcache.views``, ``logitcache.codecs``, ``logitcache.errors``
(the sample source and the ranks come from the caller).
"""
