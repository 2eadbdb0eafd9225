"""mdlib: the support library of the MindDiffuser notebook course.

Layers, lowest first (no import runs back up):

- ``mdlib.stats``, ``mdlib.cachekey``, ``mdlib.progress``: what every layer shares (Pearson r, cache keys,
  progress bars and their ``MDLIB_PROGRESS`` switch).
- ``mdlib.record``, ``mdlib.runstate``: files written atomically (results, images, arrays) and the resumable
  state of long runs, kept by callers so that the algorithms themselves write no files.
- ``mdlib.paths``: the data root (``MDLIB_DATA``) and run folders.
- ``mdlib.nsd``: the Natural Scenes Dataset on disk (layout, design, stimuli, betas, ROIs).
- ``mdlib.synth``: mini-NSD, a synthetic NSD written in NSD's exact formats.
- ``mdlib.viz``: figures for the lessons.
- ``mdlib.course``: runs the notebooks with papermill and gathers their recorded numbers.
- ``mdlib.cli``: the ``mdlib`` command.
"""

import os as _os
import warnings as _warnings

# On small CPU machines (2 cores) numpy's OpenBLAS threads and torch's OpenMP threads take turns on the same
# cores; with OpenMP's default busy-waiting, each library's idle threads spin while the other works, and a
# 360 x 360 eigendecomposition after a numpy call took 2-5 s instead of 0.03 s (measured on the CI machine).
# Passive waiting removes that. It only takes effect if set before torch is first imported, so set it here
# (mdlib is imported first in the lessons), in the Makefile, and for the kernels that `mdlib course` starts.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# mdlib's own bars are plain tqdm (mdlib.progress), but libraries the lessons use (diffusers, transformers,
# huggingface_hub) draw theirs with tqdm.auto, which in a Jupyter kernel without ipywidgets warns
# "IProgress not found. Please update jupyter and ipywidgets..." (a TqdmWarning) and falls back to text bars.
# The warning is noise in every lesson's output, and installing ipywidgets is not needed: silence it. Matched
# by its message, so tqdm need not be imported here.
_warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
