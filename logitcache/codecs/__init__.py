"""How teacher outputs become compact rows and back, as pure functions: the logit codecs
(``logits``: top-k / full / sampled, gap codes or floats), the feature codec (``features``: PCA
basis, int8 + scale or floats) and fixed-width bit streams (``bitpack``). No storage I/O.

Imports: nothing of logitcache's (numpy and torch only).
"""
