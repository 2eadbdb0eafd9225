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

# How torch's OpenMP threads (GNU libgomp) wait between parallel regions. The tiny models run thousands of
# small operations back to back: threads that sleep between them (OMP_WAIT_POLICY=PASSIVE) made the course's
# UNet cells twice as slow as threads that spin a little first; endless spinning, on the other hand, can take
# the cores from numpy's BLAS threads on a 2-core machine. A short spin (10,000 turns, then sleep) keeps nearly
# all of the first and bounds the second (benchmarks/README.md, bench_levers.py part 4). It only takes effect if
# set before torch is first imported, so set it here (mdlib is imported first in the lessons), in the Makefile,
# and for the kernels that `mdlib course` starts; an OMP_WAIT_POLICY of the user's own still wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# mdlib's own bars are plain tqdm (mdlib.progress), but libraries the lessons use (diffusers, transformers,
# huggingface_hub) draw theirs with tqdm.auto, which in a Jupyter kernel without ipywidgets warns
# "IProgress not found. Please update jupyter and ipywidgets..." (a TqdmWarning) and falls back to text bars.
# The warning is noise in every lesson's output, and installing ipywidgets is not needed: silence it. Matched
# by its message, so tqdm need not be imported here.
_warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
