"""The Natural Scenes Dataset on disk: the same loaders read the real NSD and mini-NSD.

See ``docs/data.md`` for the formats; ``layout`` is the one place NSD's relative paths are written.
"""
