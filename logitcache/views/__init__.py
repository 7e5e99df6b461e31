"""What a view is and which views an epoch holds: recipes, per-view seeds, seeded rendering and
mixing (``augment``), each unit's and epoch's plan as arrays (``plan``), and the DataLoader that
renders planned batches in its workers (``loader``).

Imports: ``logitcache.errors`` only (and torch, timm, numpy, PIL). Everything else builds on it.
"""
