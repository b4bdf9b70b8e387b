"""Frozen encoders: the registry of aliases and Hub ids (registry.py), the ModelSpec they resolve to
(spec.py), custom `package.module:function` encoders (zoo.py), tiny test models, and extract
(data -> encoders -> feature store).
"""

from sail.core.moved import serve_old_names

__getattr__ = serve_old_names(__name__, "sail.encoders.registry")  # sail.encoders was one module before 0.3
