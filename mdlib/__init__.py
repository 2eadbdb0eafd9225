"""mdlib: the support library of the MindDiffuser notebook course.

Layers, lowest first (no import runs back up):

- ``mdlib.paths``: the data root (``MDLIB_DATA``) and run folders.
- ``mdlib.nsd``: the Natural Scenes Dataset on disk (layout, design, stimuli, betas, ROIs).
- ``mdlib.synth``: mini-NSD, a synthetic NSD written in NSD's exact formats.
- ``mdlib.viz``: figures for the lessons.
- ``mdlib.course``: runs the notebooks with papermill and gathers their recorded numbers.
- ``mdlib.cli``: the ``mdlib`` command.
"""

__version__ = "0.1.0"
