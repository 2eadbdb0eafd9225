"""The Natural Scenes Dataset on disk: the same loaders read the real NSD and mini-NSD.

See ``../shared/NSD.md`` for the formats; ``layout`` is the one place NSD's relative paths are written.
"""
